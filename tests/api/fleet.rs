//! A fleet: several real `flow-proxy` processes sharing one registry, for tests of what happens
//! *between* proxies (convergence, failover, registry outages) rather than inside one.
//!
//! - [`SharedRegistry`]: the embedded Consul-compatible registry, running in the test process on
//!   an ephemeral 127.0.0.1 port. It can be stopped and restarted on the same address and data
//!   directory, told to fail like Consul does ([`Fault`]), and written to the way Registrator
//!   and operators write to Consul.
//! - [`ProxyProcess`]: the `flow-proxy` binary as a child process with its own API port, HAProxy
//!   port and data directory, pointed at a [`SharedRegistry`] with `--consul-address`. Stopping
//!   it is SIGTERM, as in production; the harness starts it with `--stop-haproxy-on-exit` and
//!   checks that its HAProxy went with it (unless told otherwise: [`ProxyOptions`]). Requests
//!   to it are those of its [`ProxyClient`], which it derefs to.
//!   [`ProxyOptions`] can also give it its own embedded registry instead, or a lower open-files
//!   limit; [`ProxyProcess::kill`] is SIGKILL, which leaves its HAProxy running alone.
//! - [`haproxy_processes`], [`open_files`], [`parent_pid`]: what /proc says about the processes.
//! - [`disagreements`] and [`quiescent`]: whether KV, `/services` and the routes HAProxy really
//!   serves agree service by service, once changes have stopped.
//! - [`eventually`]: "this holds within N", measured from the call.

use std::future::Future;
use std::io::Write;
use std::net::{Ipv4Addr, SocketAddr};
use std::ops::Deref;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

pub use flow_proxy::registry::embedded::Fault;
use flow_proxy::registry::embedded::{EmbeddedError, EmbeddedRegistry};
use reqwest::StatusCode;
use serde_json::{json, Value};
use tempfile::TempDir;
use tokio::time::Instant;

use crate::helpers::{free_port, START_ATTEMPTS};
use crate::proxy_client::{http_client, ProxyClient};

/// The KV prefix every [`ProxyProcess`] is started with (`--kv-prefix`).
pub const KV_PREFIX: &str = "flow-proxy";

/// How often [`eventually`] and the readiness loops look again.
const POLL: Duration = Duration::from_millis(20);

/// How long a started flow-proxy may take to answer its ping (unless
/// [`ProxyOptions::ready_timeout`] says otherwise).
const READY_TIMEOUT: Duration = Duration::from_secs(20);

/// How long a flow-proxy may take to exit after SIGTERM before it is killed.
const STOP_TIMEOUT: Duration = Duration::from_secs(15);

/// How long a restarted registry keeps retrying to bind its old address.
const REBIND_TIMEOUT: Duration = Duration::from_secs(5);

/// How long processes a stopped flow-proxy started (its HAProxy) may take to disappear.
const LEFTOVER_TIMEOUT: Duration = Duration::from_secs(5);

/// The TTL of checks made by [`SharedRegistry::register_instance_with_ttl_check`]: long enough
/// never to expire during a test, so only `pass_check`/`fail_check` change the status.
const CHECK_TTL: &str = "10m";

/// Polls `condition` every ~20 ms until it returns true and returns how long that took; panics
/// with `what` when it has not held within `timeout`, counted from this call. A check still
/// running at the deadline counts as a failure, so passing means "held within `timeout`".
pub async fn eventually<F, Fut>(what: &str, timeout: Duration, mut condition: F) -> Duration
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let start = Instant::now();
    let deadline = start + timeout;
    let mut checks = 0u32;
    loop {
        checks += 1;
        match tokio::time::timeout_at(deadline, condition()).await {
            Ok(true) => return start.elapsed(),
            Ok(false) if Instant::now() < deadline => {
                tokio::time::sleep_until((Instant::now() + POLL).min(deadline)).await;
            }
            Ok(false) => panic!("{what}: still not the case after {timeout:?} ({checks} checks)"),
            Err(_) => panic!(
                "{what}: still not the case after {timeout:?} ({checks} checks, the last one \
                 still running at the deadline)"
            ),
        }
    }
}

// ---- the registry ----------------------------------------------------------------------------

/// An embedded Consul-compatible registry every proxy of a test points at, with a data
/// directory that outlives [`stop`](SharedRegistry::stop) so that a restart keeps its state.
pub struct SharedRegistry {
    running: Option<EmbeddedRegistry>,
    address: SocketAddr,
    data_dir: TempDir,
    client: reqwest::Client,
}

impl SharedRegistry {
    /// Starts a registry on 127.0.0.1 (an ephemeral port) with a fresh data directory.
    pub async fn start() -> SharedRegistry {
        let data_dir = TempDir::new().expect("registry data directory");
        let registry =
            EmbeddedRegistry::start(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)), data_dir.path())
                .await
                .expect("the embedded registry starts");
        SharedRegistry {
            address: registry.address(),
            running: Some(registry),
            data_dir,
            client: http_client(),
        }
    }

    /// `127.0.0.1:<port>`, as `--consul-address` takes it. It stays the same across restarts.
    pub fn address(&self) -> String {
        self.address.to_string()
    }

    /// `http://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("http://{}", self.address)
    }

    /// Shuts the registry down the way a Consul agent goes away: its state is written to the
    /// data directory and its address refuses connections until [`restart`](Self::restart).
    pub async fn stop(&mut self) {
        let registry = self
            .running
            .take()
            .expect("stop(): the registry is running");
        registry.shutdown().await;
    }

    /// Starts the registry again on the same address and data directory: what it persisted
    /// (services, checks, KV) is back; a fault set before the stop is not (it starts healthy).
    pub async fn restart(&mut self) {
        assert!(self.running.is_none(), "restart(): stop() first");
        let deadline = Instant::now() + REBIND_TIMEOUT;
        let registry = loop {
            match EmbeddedRegistry::start(self.address, self.data_dir.path()).await {
                Ok(registry) => break registry,
                // The old listener's port can take a moment to become bindable again.
                Err(EmbeddedError::Bind { source, .. })
                    if source.kind() == std::io::ErrorKind::AddrInUse
                        && Instant::now() < deadline =>
                {
                    tokio::time::sleep(POLL).await;
                }
                Err(error) => panic!(
                    "the registry does not start again on {}: {error}",
                    self.address
                ),
            }
        };
        self.running = Some(registry);
        eventually("the restarted registry answers", REBIND_TIMEOUT, || async {
            self.client
                .get(format!("{}/v1/status/leader", self.url()))
                .send()
                .await
                .is_ok_and(|response| response.status() == StatusCode::OK)
        })
        .await;
    }

    /// Throws away everything the stopped registry persisted, as when a Consul cluster is rebuilt
    /// without its data: the next [`restart`](Self::restart) starts empty, with low indexes.
    pub fn lose_data(&self) {
        assert!(self.running.is_none(), "lose_data(): stop() first");
        let state = self.data_dir.path().join("registry");
        if state.exists() {
            std::fs::remove_dir_all(&state).expect("remove the registry's state");
        }
    }

    /// How many requests each path (without its query) got since the registry last started.
    pub fn request_counts(&self) -> std::collections::BTreeMap<String, u64> {
        self.running
            .as_ref()
            .expect("request_counts(): the registry is running")
            .request_counts()
    }

    /// Makes every following request fail as Consul does in that situation (`None` heals):
    /// [`Fault::NoLeader`] → `500 No cluster leader` on KV, catalog and health;
    /// [`Fault::PermissionDenied`] → `403 Permission denied` on KV and agent writes;
    /// [`Fault::ServiceReadDenied`] → catalog and health reads filtered as for a token without
    /// `service:read`.
    pub fn set_fault(&self, fault: Option<Fault>) {
        self.running
            .as_ref()
            .expect("set_fault(): the registry is running")
            .set_fault(fault);
    }

    /// Registers an instance at 127.0.0.1:`port` without a check, the way Registrator does.
    pub async fn register_instance(&self, service: &str, id: &str, port: u16) {
        self.register(json!({
            "ID": id, "Name": service, "Port": port, "Address": "127.0.0.1",
            "Check": null, "Checks": null
        }))
        .await;
    }

    /// Registers an instance at 127.0.0.1:`port` with a TTL check, then passes the check so that
    /// the instance is healthy; returns the check's ID for [`fail_check`](Self::fail_check) and
    /// [`pass_check`](Self::pass_check).
    pub async fn register_instance_with_ttl_check(
        &self,
        service: &str,
        id: &str,
        port: u16,
    ) -> String {
        self.register(json!({
            "ID": id, "Name": service, "Port": port, "Address": "127.0.0.1",
            "Check": { "TTL": CHECK_TTL }, "Checks": null
        }))
        .await;
        // Consul names a registration's single check `service:<service ID>`.
        let check_id = format!("service:{id}");
        self.pass_check(&check_id).await;
        check_id
    }

    /// Marks a TTL check critical: its instance leaves the `?passing` health answers.
    pub async fn fail_check(&self, check_id: &str) {
        self.put_ok(&format!("/v1/agent/check/fail/{check_id}"), Vec::new())
            .await;
    }

    /// Marks a TTL check passing.
    pub async fn pass_check(&self, check_id: &str) {
        self.put_ok(&format!("/v1/agent/check/pass/{check_id}"), Vec::new())
            .await;
    }

    /// Deregisters an instance the way Registrator does when its container stops.
    pub async fn deregister_instance(&self, id: &str) {
        self.put_ok(&format!("/v1/agent/service/deregister/{id}"), Vec::new())
            .await;
    }

    /// The IDs of a service's instances whose checks all pass (`/v1/health/service/<name>?passing`),
    /// sorted.
    pub async fn passing_instance_ids(&self, service: &str) -> Vec<String> {
        let response = self
            .get(&format!("/v1/health/service/{service}?passing"))
            .await;
        let status = response.status();
        let body: Value = response.json().await.expect("health answer is JSON");
        assert_eq!(status, StatusCode::OK, "health of {service}: {body}");
        let mut ids: Vec<String> = body
            .as_array()
            .expect("health answer is a list")
            .iter()
            .filter_map(|entry| entry["Service"]["ID"].as_str().map(str::to_string))
            .collect();
        ids.sort();
        ids
    }

    /// Writes a raw value into KV, as any Consul user could.
    pub async fn put_kv(&self, key: &str, value: impl AsRef<[u8]>) {
        self.put_ok(&format!("/v1/kv/{key}"), value.as_ref().to_vec())
            .await;
    }

    /// The raw value at `key` (`None` when the key does not exist).
    pub async fn get_kv_raw(&self, key: &str) -> Option<Vec<u8>> {
        let response = self.get(&format!("/v1/kv/{key}?raw")).await;
        match response.status() {
            StatusCode::NOT_FOUND => None,
            StatusCode::OK => Some(response.bytes().await.expect("KV value").to_vec()),
            status => panic!(
                "GET /v1/kv/{key}?raw answered {status}: {}",
                response.text().await.unwrap_or_default()
            ),
        }
    }

    /// Every key starting with `prefix` (plain string prefix, as Consul matches), sorted.
    pub async fn kv_keys(&self, prefix: &str) -> Vec<String> {
        let response = self.get(&format!("/v1/kv/{prefix}?keys")).await;
        match response.status() {
            StatusCode::NOT_FOUND => Vec::new(),
            StatusCode::OK => response.json().await.expect("a JSON list of keys"),
            status => panic!(
                "GET /v1/kv/{prefix}?keys answered {status}: {}",
                response.text().await.unwrap_or_default()
            ),
        }
    }

    /// The spec flow-proxy stored for `service` at `flow-proxy/services/<service>`, parsed.
    pub async fn stored_spec(&self, service: &str) -> Option<Value> {
        self.get_kv_raw(&format!("{KV_PREFIX}/services/{service}"))
            .await
            .map(|raw| serde_json::from_slice(&raw).expect("a stored spec is JSON"))
    }

    async fn register(&self, registration: Value) {
        self.put_ok(
            "/v1/agent/service/register",
            serde_json::to_vec(&registration).expect("registration JSON"),
        )
        .await;
    }

    async fn get(&self, path: &str) -> reqwest::Response {
        self.client
            .get(format!("{}{path}", self.url()))
            .send()
            .await
            .unwrap_or_else(|error| panic!("the registry answers GET {path}: {error}"))
    }

    /// Sends `PUT <path>` and asserts Consul's success answer (200).
    async fn put_ok(&self, path: &str, body: Vec<u8>) {
        let response = self
            .client
            .put(format!("{}{path}", self.url()))
            .body(body)
            .send()
            .await
            .unwrap_or_else(|error| panic!("the registry answers PUT {path}: {error}"));
        let status = response.status();
        let text = response.text().await.unwrap_or_default();
        assert_eq!(status, StatusCode::OK, "PUT {path}: {text}");
    }
}

impl Drop for SharedRegistry {
    /// Best effort: a dropped registry stops serving (its state is written as on `stop`).
    fn drop(&mut self) {
        if let (Some(registry), Ok(runtime)) =
            (self.running.take(), tokio::runtime::Handle::try_current())
        {
            runtime.spawn(registry.shutdown());
        }
    }
}

// ---- a flow-proxy process ----------------------------------------------------------------------

/// What [`ProxyProcess::start_with`] may be told besides the registry address.
#[derive(Debug, Clone, Default)]
pub struct ProxyOptions {
    /// HAProxy's HTTP port (default: a free one). A successor taking over a stopped proxy's
    /// port passes the old [`ProxyProcess::http_port`].
    pub http_port: Option<u16>,
    /// The data directory (default: a fresh, empty one inside the process's own tempdir). The
    /// caller keeps it alive as long as the process runs.
    pub data_dir: Option<PathBuf>,
    /// More flags, appended after the harness's own (which cannot be given twice).
    pub extra_args: Vec<String>,
    /// Environment variables to set for the process (e.g. `CONSUL_HTTP_TOKEN`).
    pub env: Vec<(String, String)>,
    /// Start it without `--stop-haproxy-on-exit`, which the harness passes otherwise so that no
    /// HAProxy outlives its test. Without it flow-proxy leaves its HAProxy serving on exit
    /// (stop it with [`ProxyProcess::stop_leaving_haproxy`]) unless `STOP_HAPROXY_ON_EXIT` is
    /// set in [`env`](Self::env).
    pub omit_stop_haproxy_flag: bool,
    /// Run flow-proxy's own embedded registry on this address instead of pointing it at the
    /// registry address [`ProxyProcess::start_with`] was given (which is then ignored).
    pub embedded_registry: Option<SocketAddr>,
    /// The open-files limit (`RLIMIT_NOFILE`) the process starts with, `(soft, hard)`; `None`
    /// in either place keeps the test process's value.
    pub open_files_limit: (Option<u64>, Option<u64>),
    /// How long it may take to answer its ping (default 20 s); it answers only once it has
    /// restored every stored spec, which takes longer with thousands of them (the benches).
    pub ready_timeout: Option<Duration>,
}

/// The real `flow-proxy` binary running as a child process, with its own HAProxy.
///
/// Its stdout and stderr go to a log file ([`log`](Self::log)), printed when it is dropped
/// during a panic, i.e. when a test fails. It runs in its own process group, so that the harness
/// can tell whether its HAProxy outlived it and kill whatever is left. On Linux it also gets
/// SIGTERM when the thread that started it (a worker of the test's runtime) goes away, so an
/// aborted test run leaves no proxy serving.
pub struct ProxyProcess {
    child: tokio::process::Child,
    pid: u32,
    exit: Option<ExitStatus>,
    log_path: PathBuf,
    /// Its API and HAProxy addresses and data directory, and the requests to them.
    client: ProxyClient,
    /// Holds the log and, unless the caller gave one, the data directory.
    _scratch: TempDir,
}

impl ProxyProcess {
    /// Starts flow-proxy against the registry at `registry_address` with free ports, a fresh
    /// data directory and `extra_args`; returns once its API answers the ping.
    pub async fn start(registry_address: &str, extra_args: &[&str]) -> ProxyProcess {
        Self::start_with(
            registry_address,
            ProxyOptions {
                extra_args: extra_args.iter().map(|arg| arg.to_string()).collect(),
                ..ProxyOptions::default()
            },
        )
        .await
    }

    /// Like [`start`](Self::start), with a given HTTP port or data directory.
    pub async fn start_with(registry_address: &str, options: ProxyOptions) -> ProxyProcess {
        let scratch = TempDir::new().expect("a tempdir for the flow-proxy process");
        let data_dir = options
            .data_dir
            .clone()
            .unwrap_or_else(|| scratch.path().join("data"));
        let log_path = scratch.path().join("flow-proxy.log");
        let mut attempt = 1;
        loop {
            let api_address = SocketAddr::from((Ipv4Addr::LOCALHOST, free_port()));
            let http_port = options.http_port.unwrap_or_else(free_port);
            let registry_args = match options.embedded_registry {
                Some(address) => ["--embedded-registry-address".into(), address.to_string()],
                None => ["--consul-address".into(), registry_address.to_string()],
            };
            let (mut child, pid) = spawn_flow_proxy(
                &registry_args,
                api_address,
                http_port,
                &data_dir,
                &options,
                &log_path,
            );
            let client = ProxyClient::new(api_address, http_port, data_dir.clone());
            let ready_timeout = options.ready_timeout.unwrap_or(READY_TIMEOUT);
            let why = match wait_ready(&mut child, pid, &client, ready_timeout).await {
                Ok(()) => {
                    return ProxyProcess {
                        child,
                        pid,
                        exit: None,
                        log_path,
                        client,
                        _scratch: scratch,
                    }
                }
                Err(why) => why,
            };
            // Whatever it started must not outlive the failed attempt.
            if !live_group_members(pid).is_empty() {
                kill_group(pid);
            }
            let log = read_log(&log_path);
            // A port chosen free can be taken by someone else before flow-proxy binds it: then
            // try again with new ones (a port the caller gave stays taken, so no retry for it).
            let taken = |port: u16| {
                log.contains(&format!("API cannot listen on 127.0.0.1:{port}"))
                    || log.contains(&format!(
                        "cannot bind socket (Address already in use) for [127.0.0.1:{port}]"
                    ))
            };
            let ours_taken =
                taken(api_address.port()) || (options.http_port.is_none() && taken(http_port));
            if ours_taken && attempt < START_ATTEMPTS {
                attempt += 1;
                continue;
            }
            panic!("flow-proxy (pid {pid}) {why}; its log:\n{log}");
        }
    }

    /// The process ID of flow-proxy itself, which also names the process group it leads (see
    /// [`live_group_members`]).
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Everything flow-proxy wrote to stdout and stderr so far (all start attempts).
    pub fn log(&self) -> String {
        read_log(&self.log_path)
    }

    /// Kills flow-proxy alone with SIGKILL, as `kill -9` or the OOM killer does, and reaps it.
    /// The HAProxy it started is left running on its own, as it would be in production; it is
    /// killed with the rest of the process group when this handle drops.
    pub async fn kill(&mut self) -> ExitStatus {
        if let Some(status) = self.exit {
            return status;
        }
        signal(self.pid, libc::SIGKILL);
        let status = self.child.wait().await.expect("reap the killed flow-proxy");
        self.exit = Some(status);
        status
    }

    /// Stops flow-proxy with SIGTERM, as an orchestrator does, and returns its exit status.
    /// Panics (after killing them) if it is still running 15 s later or if any process it
    /// started, i.e. its HAProxy, is still running after it exited. Stopping twice returns the
    /// first status.
    pub async fn stop(&mut self) -> ExitStatus {
        if let Some(status) = self.exit {
            return status;
        }
        if let Some(status) = self.child.try_wait().expect("flow-proxy's status") {
            self.exit = Some(status);
        } else {
            signal(self.pid, libc::SIGTERM);
            match tokio::time::timeout(STOP_TIMEOUT, self.child.wait()).await {
                Ok(status) => self.exit = Some(status.expect("flow-proxy's exit status")),
                Err(_) => {
                    kill_group(self.pid);
                    self.exit = Some(self.child.wait().await.expect("reap flow-proxy"));
                    panic!(
                        "flow-proxy (pid {}) did not exit within {STOP_TIMEOUT:?} of SIGTERM \
                         and was killed; its log:\n{}",
                        self.pid,
                        self.log()
                    );
                }
            }
        }
        let started_at = Instant::now();
        while !live_group_members(self.pid).is_empty() {
            if started_at.elapsed() > LEFTOVER_TIMEOUT {
                let left = live_group_members(self.pid);
                kill_group(self.pid);
                panic!(
                    "flow-proxy (pid {}) exited but left processes running (killed now): {left:?}",
                    self.pid
                );
            }
            tokio::time::sleep(POLL).await;
        }
        self.exit.expect("the exit status was just recorded")
    }

    /// Stops flow-proxy with SIGTERM and waits for it to exit (killing it after 15 s, then
    /// panicking), without requiring its HAProxy to be gone: for a proxy started with
    /// [`ProxyOptions::omit_stop_haproxy_flag`]. Whatever is left is killed when it is dropped.
    pub async fn stop_leaving_haproxy(&mut self) -> ExitStatus {
        if let Some(status) = self.exit {
            return status;
        }
        signal(self.pid, libc::SIGTERM);
        match tokio::time::timeout(STOP_TIMEOUT, self.child.wait()).await {
            Ok(status) => {
                let status = status.expect("flow-proxy's exit status");
                self.exit = Some(status);
                status
            }
            Err(_) => {
                kill_group(self.pid);
                self.exit = Some(self.child.wait().await.expect("reap flow-proxy"));
                panic!(
                    "flow-proxy (pid {}) did not exit within {STOP_TIMEOUT:?} of SIGTERM and was \
                     killed; its log:\n{}",
                    self.pid,
                    self.log()
                );
            }
        }
    }
}

impl Deref for ProxyProcess {
    type Target = ProxyClient;

    fn deref(&self) -> &ProxyClient {
        &self.client
    }
}

impl Drop for ProxyProcess {
    fn drop(&mut self) {
        if self.exit.is_none() {
            if let Ok(None) = self.child.try_wait() {
                // The normal way down first: flow-proxy stops its HAProxy on SIGTERM.
                signal(self.pid, libc::SIGTERM);
                let deadline = std::time::Instant::now() + STOP_TIMEOUT;
                while matches!(self.child.try_wait(), Ok(None))
                    && std::time::Instant::now() < deadline
                {
                    std::thread::sleep(POLL);
                }
            }
        }
        // Whatever is still running (flow-proxy ignoring SIGTERM, or an HAProxy it left behind).
        if !live_group_members(self.pid).is_empty() {
            kill_group(self.pid);
        }
        if std::thread::panicking() {
            eprintln!(
                "---- log of flow-proxy (pid {}, API {}, HTTP port {}) ----\n{}",
                self.pid,
                self.api(""),
                self.http_port,
                self.log()
            );
        }
    }
}

/// Waits until the API `client` calls answers its ping with 200. Fails early, with the reason,
/// when the process exits; kills it when it does not answer within `timeout`.
async fn wait_ready(
    child: &mut tokio::process::Child,
    pid: u32,
    client: &ProxyClient,
    timeout: Duration,
) -> Result<(), String> {
    let deadline = Instant::now() + timeout;
    let ping = client.api("/v1/docker-flow-proxy/ping");
    loop {
        if let Some(status) = child.try_wait().expect("flow-proxy's status") {
            return Err(format!("exited ({status}) before answering its ping"));
        }
        let answered = client
            .http()
            .get(&ping)
            .timeout(Duration::from_secs(1))
            .send()
            .await
            .is_ok_and(|response| response.status() == StatusCode::OK);
        if answered {
            return Ok(());
        }
        if Instant::now() >= deadline {
            kill_group(pid);
            child.wait().await.expect("reap flow-proxy");
            return Err(format!(
                "did not answer its ping within {timeout:?} (killed)"
            ));
        }
        tokio::time::sleep(POLL).await;
    }
}

/// A log file's text (or why there is none).
fn read_log(path: &Path) -> String {
    std::fs::read(path)
        .map(|bytes| String::from_utf8_lossy(&bytes).into_owned())
        .unwrap_or_else(|error| format!("(no log at {}: {error})", path.display()))
}

/// Starts the binary; returns the child and its pid (which is also its process group ID).
fn spawn_flow_proxy(
    registry_args: &[String; 2],
    api_address: SocketAddr,
    http_port: u16,
    data_dir: &Path,
    options: &ProxyOptions,
    log_path: &Path,
) -> (tokio::process::Child, u32) {
    let extra_args = &options.extra_args;
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log_path)
        .expect("flow-proxy log file");
    writeln!(
        &log,
        "---- starting flow-proxy: registry {registry_args:?}, API {api_address}, HTTP port \
         {http_port}, data dir {}, extra args {extra_args:?} ----",
        data_dir.display()
    )
    .expect("write the flow-proxy log");
    let log_too = log.try_clone().expect("flow-proxy log file");
    let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_flow-proxy"));
    command
        .args(registry_args)
        .arg("--api-address")
        .arg(api_address.to_string())
        .arg("--bind-host")
        .arg("127.0.0.1")
        .arg("--http-port")
        .arg(http_port.to_string())
        // Unused until a certificate is stored, but never the privileged default.
        .arg("--https-port")
        .arg(free_port().to_string())
        .arg("--data-dir")
        .arg(data_dir)
        .arg("--kv-prefix")
        .arg(KV_PREFIX)
        .args((!options.omit_stop_haproxy_flag).then_some("--stop-haproxy-on-exit"))
        .args(&options.extra_args)
        // Settings not given as flags must not come from the environment the tests run in.
        .env_remove("EMBEDDED_REGISTRY_ADDRESS")
        .env_remove("HAPROXY_BINARY")
        .env_remove("TEMPLATES_DIR")
        .env_remove("CONSUL_HTTP_TOKEN")
        .env_remove("WATCH_INSTANCES")
        .env_remove("STOP_HAPROXY_ON_EXIT")
        .env_remove("API_TOKEN")
        .env_remove("API_TOKEN_FILE")
        .env_remove("API_USERS")
        .env_remove("INSECURE_API")
        .env_remove("USERS")
        .env_remove("USERS_PASS_ENCRYPTED")
        .env_remove("STATS_USER")
        .env_remove("STATS_PASS")
        .env_remove("STATS_URI")
        .env_remove("STATS_PORT")
        .env_remove("HTTPS_ONLY")
        .env_remove("ENABLE_H2")
        // Proxy-wide settings (Docker Flow Proxy's names).
        .env_remove("TIMEOUT_CONNECT")
        .env_remove("TIMEOUT_CLIENT")
        .env_remove("TIMEOUT_SERVER")
        .env_remove("TIMEOUT_QUEUE")
        .env_remove("TIMEOUT_TUNNEL")
        .env_remove("TIMEOUT_HTTP_REQUEST")
        .env_remove("TIMEOUT_HTTP_KEEP_ALIVE")
        .env_remove("CONNECTION_MODE")
        .env_remove("MAXCONN")
        .env_remove("EXTRA_GLOBAL")
        .env_remove("EXTRA_FRONTEND")
        .env_remove("CAPTURE_REQUEST_HEADER")
        .env_remove("DEBUG")
        .envs(options.env.iter().map(|(name, value)| (name, value)))
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(log_too)
        .process_group(0)
        .kill_on_drop(true);
    if options.open_files_limit != (None, None) {
        let (soft, hard) = options.open_files_limit;
        let soft = soft.map(|limit| libc::rlim_t::try_from(limit).expect("a limit fits rlim_t"));
        let hard = hard.map(|limit| libc::rlim_t::try_from(limit).expect("a limit fits rlim_t"));
        // SAFETY: the closure runs between fork and exec and only makes async-signal-safe system
        // calls (getrlimit, setrlimit) on a stack value; it allocates nothing.
        unsafe {
            command.pre_exec(move || {
                let mut limit = libc::rlimit {
                    rlim_cur: 0,
                    rlim_max: 0,
                };
                if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                limit.rlim_max = hard.unwrap_or(limit.rlim_max);
                limit.rlim_cur = soft.unwrap_or(limit.rlim_cur).min(limit.rlim_max);
                if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
    }
    #[cfg(target_os = "linux")]
    {
        let parent = libc::pid_t::try_from(std::process::id()).expect("a pid fits pid_t");
        // SAFETY: the closure runs between fork and exec and only makes async-signal-safe system
        // calls (prctl, getppid); it allocates nothing.
        unsafe {
            command.pre_exec(move || {
                let signal = libc::c_ulong::try_from(libc::SIGTERM).unwrap_or_default();
                if libc::prctl(libc::PR_SET_PDEATHSIG, signal) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                // The test process died before prctl took effect: do not start at all.
                if libc::getppid() != parent {
                    return Err(std::io::Error::from_raw_os_error(libc::ESRCH));
                }
                Ok(())
            });
        }
    }
    let child = command.spawn().expect("start the flow-proxy binary");
    let pid = child.id().expect("a just-started child has a pid");
    (child, pid)
}

/// Sends `signal` to one process.
fn signal(pid: u32, signal: libc::c_int) {
    let pid = libc::pid_t::try_from(pid).expect("a pid fits pid_t");
    // SAFETY: kill(2) has no memory-safety preconditions; the pid is our child, not yet reaped.
    unsafe {
        libc::kill(pid, signal);
    }
}

/// SIGKILLs every process in the group flow-proxy leads (flow-proxy and its HAProxy).
fn kill_group(group: u32) {
    let group = libc::pid_t::try_from(group).expect("a pid fits pid_t");
    // SAFETY: as above; a negative pid names the process group.
    unsafe {
        libc::kill(-group, libc::SIGKILL);
    }
}

/// The HAProxy processes serving from `data_dir` (their command line has `-f <data
/// dir>/haproxy.cfg`, or `-f <data dir>/haproxy.cfg.candidate` for one started on a change
/// before it was promoted; `haproxy -c` runs do not count), zombies excluded, from /proc (so
/// always empty off Linux).
pub fn haproxy_processes(data_dir: &Path) -> Vec<u32> {
    let data_dir = data_dir.canonicalize().expect("the data directory exists");
    let files = [
        data_dir.join("haproxy.cfg"),
        data_dir.join("haproxy.cfg.candidate"),
    ];
    let files = files.map(|file| file.into_os_string().into_encoded_bytes());
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut pids: Vec<u32> = entries
        .filter_map(|entry| {
            let pid: u32 = entry.ok()?.file_name().to_str()?.parse().ok()?;
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
            let state = stat.rsplit_once(')')?.1.split_whitespace().next()?;
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
            let mut args = cmdline.split(|byte| *byte == 0);
            let serves = args.any(|arg| files.iter().any(|file| arg == file.as_slice()));
            let checks = cmdline.split(|byte| *byte == 0).any(|arg| arg == b"-c");
            (state != "Z" && serves && !checks).then_some(pid)
        })
        .collect();
    pids.sort_unstable();
    pids
}

/// SIGKILLs each of `pids`: HAProxy processes a test's flow-proxies started (found with
/// [`haproxy_processes`] just before), e.g. one left behind on purpose by a killed flow-proxy.
pub fn kill_processes(pids: &[u32]) {
    for pid in pids {
        let pid = libc::pid_t::try_from(*pid).expect("a pid fits pid_t");
        // SAFETY: kill(2) has no memory-safety preconditions; the caller names processes its own
        // test started.
        unsafe {
            libc::kill(pid, libc::SIGKILL);
        }
    }
}

/// The number of open file descriptors of process `pid` (entries of /proc/<pid>/fd; `None`
/// off Linux or when the process is gone).
pub fn open_files(pid: u32) -> Option<usize> {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .ok()
        .map(|entries| entries.count())
}

/// The processes of process group `group` that are still running (zombies excluded), as
/// `(pid, command name)`, read from /proc (so always empty off Linux). For a [`ProxyProcess`]
/// this is flow-proxy and the HAProxy processes it started; empty once they are all gone.
pub fn live_group_members(group: u32) -> Vec<(u32, String)> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|entry| {
            let pid: u32 = entry.ok()?.file_name().to_str()?.parse().ok()?;
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
            // `pid (comm) state ppid pgrp ...`; comm may hold spaces and parentheses.
            let (head, rest) = stat.rsplit_once(')')?;
            let name = head.split_once('(')?.1.to_string();
            let mut fields = rest.split_whitespace();
            let state = fields.next()?;
            let _parent = fields.next()?;
            let pgrp: u32 = fields.next()?.parse().ok()?;
            (pgrp == group && state != "Z").then_some((pid, name))
        })
        .collect()
}

/// The parent process ID of `pid` (from /proc; `None` off Linux or when it is gone).
pub fn parent_pid(pid: u32) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let mut fields = stat.rsplit_once(')')?.1.split_whitespace();
    let _state = fields.next()?;
    fields.next()?.parse().ok()
}

// ---- agreement between KV, /services and HAProxy ------------------------------------------------

/// The path the random workloads of the crash and chaos tests route version `version` of
/// `service` at: `/v<version>/<service>`. With service names of equal length no path is a
/// prefix of another, so each request matches at most one route.
pub fn versioned_path(service: &str, version: u32) -> String {
    format!("/v{version}/{service}")
}

/// Compares, service by service, the spec stored in KV (`<kv-prefix>/services/<name>`, read raw
/// from `registry`), the spec `/services` lists, and what HAProxy really serves: the stored
/// version's path must reach the service's own backend (which answers `<name> <path>`), and no
/// other version's path (`0..versions`, see [`versioned_path`]) may answer 200; a service
/// stored nowhere must answer no path with 200. Returns one line per disagreement (none when all
/// three agree on every service) and how many requests it sent through HAProxy.
pub async fn disagreements(
    registry: &SharedRegistry,
    proxy: &ProxyClient,
    services: &[String],
    versions: u32,
) -> (Vec<String>, usize) {
    let listed = proxy.services().await;
    let listed = listed.as_array().expect("/services answers a list");
    let mut found = Vec::new();
    let mut requests = 0;
    for service in services {
        let stored = registry.stored_spec(service).await;
        let routed = listed
            .iter()
            .find(|spec| spec["ServiceName"].as_str() == Some(service.as_str()));
        if stored.as_ref() != routed {
            found.push(format!(
                "{service}: KV holds {stored:?} but /services lists {routed:?}"
            ));
        }
        let stored_path = stored
            .as_ref()
            .and_then(|spec| spec["ServiceDest"][0]["ServicePath"][0].as_str());
        for version in 0..versions {
            let path = versioned_path(service, version);
            let request = format!("{path}/probe");
            let (status, body) = proxy.get_through_proxy(&request, None).await;
            requests += 1;
            let expected_body = format!("{service} {request}");
            let served = status == StatusCode::OK && body == expected_body;
            let should_serve = stored_path == Some(path.as_str());
            if served != should_serve || (!served && status == StatusCode::OK) {
                found.push(format!(
                    "{service}: KV routes it at {stored_path:?}, but GET {request} through \
                     HAProxy answered {status} {body:?}"
                ));
            }
        }
    }
    (found, requests)
}

/// What KV, `/services` and `/config` hold at one moment, to tell when changes have stopped.
async fn state_of(registry: &SharedRegistry, proxy: &ProxyClient) -> (Vec<String>, Value, String) {
    let mut stored = Vec::new();
    for key in registry.kv_keys(&format!("{KV_PREFIX}/services/")).await {
        let value = registry.get_kv_raw(&key).await.unwrap_or_default();
        stored.push(format!("{key}={}", String::from_utf8_lossy(&value)));
    }
    (stored, proxy.services().await, proxy.config().await)
}

/// Waits until KV, `/services` and `/config` have stayed the same for `calm` (at most
/// `timeout`), i.e. flow-proxy has applied everything it will apply; returns how long that took.
pub async fn quiescent(
    registry: &SharedRegistry,
    proxy: &ProxyClient,
    calm: Duration,
    timeout: Duration,
) -> Duration {
    let started = Instant::now();
    let mut last = state_of(registry, proxy).await;
    let mut unchanged_since = Instant::now();
    loop {
        if unchanged_since.elapsed() >= calm {
            return started.elapsed();
        }
        assert!(
            started.elapsed() < timeout,
            "KV, /services and /config still change after {timeout:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
        let now = state_of(registry, proxy).await;
        if now != last {
            last = now;
            unchanged_since = Instant::now();
        }
    }
}
