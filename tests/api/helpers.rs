//! `TestProxy`: a whole flow-proxy (API, embedded registry, real HAProxy) on ephemeral loopback
//! ports, plus tiny backend servers that say who they are.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::Once;
use std::time::Duration;

use flow_proxy::settings::Settings;
use flow_proxy::FlowProxy;
use reqwest::StatusCode;
use serde_json::Value;

/// A free TCP port on 127.0.0.1 (bound, then released for HAProxy to bind).
pub fn free_port() -> u16 {
    let listener =
        std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind an ephemeral port");
    listener.local_addr().expect("local address").port()
}

fn init_tracing() {
    static INIT: Once = Once::new();
    INIT.call_once(|| {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(
                tracing_subscriber::EnvFilter::try_from_default_env()
                    .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
            )
            .with_test_writer()
            .try_init();
    });
}

fn require_haproxy() {
    let found = std::process::Command::new("haproxy").arg("-v").output();
    assert!(
        matches!(found, Ok(ref output) if output.status.success()),
        "HAProxy is not installed: these tests drive a real haproxy. Run the README's test command \
         (it installs HAProxy from the OS packages) or `apt-get install haproxy`."
    );
}

/// A running flow-proxy with its own data directory, HAProxy port and embedded registry.
pub struct TestProxy {
    app: Option<FlowProxy>,
    settings: Settings,
    pub data_dir: tempfile::TempDir,
    pub http_port: u16,
    client: reqwest::Client,
}

impl TestProxy {
    /// Starts flow-proxy with the embedded registry, HAProxy bound to 127.0.0.1:<free port>.
    pub async fn spawn() -> TestProxy {
        Self::spawn_with(|_| {}).await
    }

    /// Like [`TestProxy::spawn`], after `customise` has changed the settings.
    pub async fn spawn_with(customise: impl FnOnce(&mut Settings)) -> TestProxy {
        init_tracing();
        require_haproxy();
        let data_dir = tempfile::tempdir().expect("temporary data directory");
        let http_port = free_port();
        let mut settings = Settings {
            api_address: SocketAddr::from((Ipv4Addr::LOCALHOST, 0)),
            consul_address: Vec::new(),
            embedded_registry_address: SocketAddr::from((Ipv4Addr::LOCALHOST, 0)),
            data_dir: data_dir.path().to_path_buf(),
            haproxy_binary: PathBuf::from("haproxy"),
            bind_host: Some(Ipv4Addr::LOCALHOST.into()),
            http_port,
            templates_dir: None,
            kv_prefix: "flow-proxy".into(),
            consul_token: None,
            watch_instances: true,
        };
        customise(&mut settings);
        let app = FlowProxy::start(settings.clone())
            .await
            .expect("flow-proxy starts");
        TestProxy {
            app: Some(app),
            settings,
            data_dir,
            http_port,
            // One connection per request, so that HAProxy's balancing is visible request by request.
            client: reqwest::Client::builder()
                .pool_max_idle_per_host(0)
                .timeout(Duration::from_secs(20))
                .build()
                .expect("HTTP client"),
        }
    }

    fn app(&self) -> &FlowProxy {
        self.app.as_ref().expect("flow-proxy is running")
    }

    /// Stops flow-proxy (and its HAProxy and registry), keeping the data directory.
    pub async fn stop(&mut self) {
        if let Some(app) = self.app.take() {
            app.stop().await;
        }
    }

    /// Starts flow-proxy again on the same data directory and HAProxy port.
    pub async fn start_again(&mut self) {
        assert!(self.app.is_none(), "stop() first");
        self.app = Some(
            FlowProxy::start(self.settings.clone())
                .await
                .expect("flow-proxy starts again"),
        );
    }

    /// The `host:port` of the registry this proxy uses (its embedded one unless told otherwise),
    /// what another proxy's `--consul-address` takes. (The benches use it.)
    #[allow(dead_code)]
    pub fn registry_address(&self) -> String {
        self.app()
            .registry_url()
            .trim_start_matches("http://")
            .to_string()
    }

    /// The URL of an API endpoint, e.g. `api("/v1/docker-flow-proxy/ping")`.
    pub fn api(&self, path_and_query: &str) -> String {
        format!("http://{}{}", self.app().api_address(), path_and_query)
    }

    /// Sends a GET to the API and returns the status and the JSON answer.
    pub async fn api_get(&self, path_and_query: &str) -> (StatusCode, Value) {
        let response = self
            .client
            .get(self.api(path_and_query))
            .send()
            .await
            .expect("API answers");
        let status = response.status();
        let body = response.json().await.expect("API answers JSON");
        (status, body)
    }

    /// Calls `/v1/docker-flow-proxy/reconfigure?<query>`.
    pub async fn reconfigure(&self, query: &str) -> (StatusCode, Value) {
        self.api_get(&format!("/v1/docker-flow-proxy/reconfigure?{query}"))
            .await
    }

    /// Calls `/v1/docker-flow-proxy/remove?<query>`.
    pub async fn remove(&self, query: &str) -> (StatusCode, Value) {
        self.api_get(&format!("/v1/docker-flow-proxy/remove?{query}"))
            .await
    }

    /// The haproxy.cfg HAProxy runs now, as `/config` shows it.
    pub async fn config(&self) -> String {
        let response = self
            .client
            .get(self.api("/v1/docker-flow-proxy/config"))
            .send()
            .await
            .expect("API answers");
        assert_eq!(response.status(), StatusCode::OK);
        response.text().await.expect("config text")
    }

    /// Registers an instance in the registry the way Registrator does.
    pub async fn register_instance(&self, service: &str, id: &str, port: u16) {
        let body = serde_json::json!({
            "ID": id, "Name": service, "Port": port, "Address": "127.0.0.1", "Check": null, "Checks": null
        });
        let response = self
            .client
            .put(format!(
                "{}/v1/agent/service/register",
                self.app().registry_url()
            ))
            .json(&body)
            .send()
            .await
            .expect("registry answers");
        assert_eq!(response.status(), StatusCode::OK, "register {id}");
    }

    /// Deregisters an instance the way Registrator does when its container stops.
    pub async fn deregister_instance(&self, id: &str) {
        let response = self
            .client
            .put(format!(
                "{}/v1/agent/service/deregister/{id}",
                self.app().registry_url()
            ))
            .send()
            .await
            .expect("registry answers");
        assert_eq!(response.status(), StatusCode::OK, "deregister {id}");
    }

    /// The spec stored in KV for `service` (`None` when the key does not exist).
    pub async fn stored_spec(&self, service: &str) -> Option<Value> {
        let response = self
            .client
            .get(format!(
                "{}/v1/kv/flow-proxy/services/{service}?raw",
                self.app().registry_url()
            ))
            .send()
            .await
            .expect("registry answers");
        if response.status() == StatusCode::NOT_FOUND {
            return None;
        }
        assert_eq!(response.status(), StatusCode::OK);
        Some(serde_json::from_slice(&response.bytes().await.expect("value")).expect("a JSON spec"))
    }

    /// Writes a raw value into the registry's KV store, as any Consul user could.
    pub async fn put_kv(&self, key: &str, value: &str) {
        let response = self
            .client
            .put(format!("{}/v1/kv/{key}", self.app().registry_url()))
            .body(value.to_string())
            .send()
            .await
            .expect("registry answers");
        assert_eq!(response.status(), StatusCode::OK, "PUT {key}");
    }

    /// Sends `GET <path>` through HAProxy (with a Host header when given); status and body.
    pub async fn get_through_proxy(&self, path: &str, host: Option<&str>) -> (StatusCode, String) {
        let mut request = self
            .client
            .get(format!("http://127.0.0.1:{}{}", self.http_port, path));
        if let Some(host) = host {
            request = request.header(reqwest::header::HOST, host);
        }
        let response = request.send().await.expect("HAProxy answers");
        let status = response.status();
        (status, response.text().await.expect("body"))
    }

    /// What HAProxy runs now, to check later that a refused change changed nothing.
    pub async fn snapshot(&self) -> Snapshot {
        Snapshot {
            config: self.config().await,
            haproxy_pid: self.haproxy_pid().await,
        }
    }

    /// Asserts that haproxy.cfg is byte-identical and HAProxy was not reloaded since `before`.
    pub async fn assert_unchanged_since(&self, before: &Snapshot) {
        assert_eq!(
            self.config().await,
            before.config,
            "haproxy.cfg is unchanged"
        );
        assert_eq!(
            self.haproxy_pid().await,
            before.haproxy_pid,
            "HAProxy was not reloaded"
        );
    }

    /// The PID of the HAProxy process serving now, asked on its stats socket.
    pub async fn haproxy_pid(&self) -> Option<u32> {
        flow_proxy::haproxy::serving_pid(
            &self
                .data_dir
                .path()
                .canonicalize()
                .expect("data dir")
                .join("haproxy.sock"),
        )
        .await
    }
}

impl Drop for TestProxy {
    fn drop(&mut self) {
        // HAProxy children are killed when their handles drop with the runtime (kill_on_drop).
        self.app.take();
    }
}

/// The running configuration and HAProxy process at one moment.
pub struct Snapshot {
    config: String,
    haproxy_pid: Option<u32>,
}

/// A backend HTTP server on 127.0.0.1 that answers every request with `<name> <path>`.
pub struct Backend {
    pub port: u16,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Starts a [`Backend`] called `name`.
pub async fn spawn_backend(name: &str) -> Backend {
    let listener = tokio::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .await
        .expect("bind backend");
    let port = listener.local_addr().expect("backend address").port();
    let name = name.to_string();
    let app = axum::Router::new().fallback(move |uri: axum::http::Uri| {
        let name = name.clone();
        async move { format!("{name} {}", uri.path()) }
    });
    let task = tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    Backend { port, task }
}

/// Asks `path` through the proxy `count` times; returns the backend names that answered, in order.
pub async fn names_answering(
    proxy: &TestProxy,
    path: &str,
    host: Option<&str>,
    count: usize,
) -> Vec<String> {
    let mut names = Vec::with_capacity(count);
    for _ in 0..count {
        let (status, body) = proxy.get_through_proxy(path, host).await;
        assert_eq!(status, StatusCode::OK, "GET {path} through HAProxy: {body}");
        names.push(body.split(' ').next().unwrap_or_default().to_string());
    }
    names
}
