//! `TestProxy`: a whole flow-proxy (API, embedded registry, real HAProxy) on ephemeral loopback
//! ports, plus tiny backend servers that say who they are.

use std::collections::BTreeSet;
use std::net::{Ipv4Addr, SocketAddr};
use std::ops::Deref;
use std::path::PathBuf;
use std::sync::{Mutex, Once, PoisonError};

use flow_proxy::settings::Settings;
use flow_proxy::FlowProxy;
use reqwest::StatusCode;
use serde_json::Value;

use crate::proxy_client::ProxyClient;

/// How many times [`TestProxy::spawn_with`] (and the fleet's `ProxyProcess::start_with`) picks
/// new ports when one it picked was taken between choosing and binding.
pub const START_ATTEMPTS: u32 = 3;

/// A free TCP port on 127.0.0.1 (bound, then released for HAProxy to bind), never one this test
/// process handed out before: HAProxy binds with `SO_REUSEPORT`, so two proxies of the suite
/// given the same released port would both bind it and share its connections instead of one
/// failing to start.
pub fn free_port() -> u16 {
    static HANDED_OUT: Mutex<BTreeSet<u16>> = Mutex::new(BTreeSet::new());
    loop {
        let listener =
            std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind an ephemeral port");
        let port = listener.local_addr().expect("local address").port();
        let mut handed_out = HANDED_OUT.lock().unwrap_or_else(PoisonError::into_inner);
        if handed_out.insert(port) {
            return port;
        }
    }
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

/// The settings of a test proxy: everything on 127.0.0.1 (API and registry on ephemeral ports,
/// HAProxy on a free port), the embedded registry, data in `data_dir`.
pub fn test_settings(data_dir: &std::path::Path) -> Settings {
    Settings {
        api_address: Some(SocketAddr::from((Ipv4Addr::LOCALHOST, 0))),
        api_token: None,
        api_token_file: None,
        api_users: None,
        insecure_api: false,
        open_read_endpoints: false,
        consul_address: Vec::new(),
        embedded_registry_address: SocketAddr::from((Ipv4Addr::LOCALHOST, 0)),
        data_dir: data_dir.to_path_buf(),
        haproxy_binary: PathBuf::from("haproxy"),
        bind_host: Some(Ipv4Addr::LOCALHOST.into()),
        http_port: free_port(),
        https_port: free_port(),
        enable_h2: true,
        https_only: false,
        ca_file: None,
        templates_dir: None,
        users: None,
        users_pass_encrypted: false,
        stats_user: None,
        stats_pass: None,
        stats_uri: "/admin?stats".into(),
        stats_port: None,
        service_domain_algo: Default::default(),
        kv_prefix: "flow-proxy".into(),
        consul_token: None,
        watch_instances: true,
        max_services: 10_000,
        change_timeout: 20,
        // Tests start many proxies: each one's HAProxy goes with it.
        stop_haproxy_on_exit: true,
        allow_backend_extra: false,
        proxy_wide: Default::default(),
        log_format: flow_proxy::settings::LogFormat::Text,
        acme: Default::default(),
    }
}

/// A running flow-proxy with its own data directory, HAProxy port and embedded registry. The
/// requests to its API and through its HAProxy are those of its [`ProxyClient`] (it derefs to
/// it); what is its own is the in-process lifecycle and the embedded registry.
pub struct TestProxy {
    app: Option<FlowProxy>,
    settings: Settings,
    pub data_dir: tempfile::TempDir,
    client: ProxyClient,
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
        let mut settings = test_settings(data_dir.path());
        let chosen = (settings.http_port, settings.https_port);
        customise(&mut settings);
        let mut attempt = 1;
        let app = loop {
            let error = match FlowProxy::start(settings.clone()).await {
                Ok(app) => break app,
                Err(error) => error,
            };
            // A port chosen free can be taken by another test before HAProxy binds it: then
            // try again with new ones (a port the test chose itself stays as it is).
            let ours = (settings.http_port, settings.https_port) == chosen;
            let taken = [settings.http_port, settings.https_port]
                .iter()
                .any(|port| {
                    format!("{error:?}").contains(&format!(
                        "cannot bind socket (Address already in use) for [127.0.0.1:{port}]"
                    ))
                });
            if !(ours && taken && attempt < START_ATTEMPTS) {
                panic!("flow-proxy starts: {error:?}");
            }
            attempt += 1;
            settings.http_port = free_port();
            settings.https_port = free_port();
        };
        let client = client_of(&app, &settings);
        TestProxy {
            app: Some(app),
            settings,
            data_dir,
            client,
        }
    }

    /// The settings it was started with.
    pub fn settings(&self) -> &Settings {
        &self.settings
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

    /// Starts flow-proxy again on the same data directory and HAProxy port (its API on a new
    /// ephemeral port, which the client follows).
    pub async fn start_again(&mut self) {
        assert!(self.app.is_none(), "stop() first");
        let app = FlowProxy::start(self.settings.clone())
            .await
            .expect("flow-proxy starts again");
        self.client = client_of(&app, &self.settings);
        self.app = Some(app);
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

    /// Registers an instance in the registry the way Registrator does.
    pub async fn register_instance(&self, service: &str, id: &str, port: u16) {
        let body = serde_json::json!({
            "ID": id, "Name": service, "Port": port, "Address": "127.0.0.1", "Check": null, "Checks": null
        });
        let response = self
            .http()
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
            .http()
            .put(format!(
                "{}/v1/agent/service/deregister/{id}",
                self.app().registry_url()
            ))
            .send()
            .await
            .expect("registry answers");
        assert_eq!(response.status(), StatusCode::OK, "deregister {id}");
    }

    /// A JSON answer of the registry this proxy uses (`path` from `/v1/…`).
    pub async fn registry_json(&self, path: &str) -> Value {
        self.http()
            .get(format!("{}{path}", self.app().registry_url()))
            .send()
            .await
            .expect("registry answers")
            .json()
            .await
            .expect("JSON")
    }

    /// The spec stored in KV for `service` (`None` when the key does not exist).
    pub async fn stored_spec(&self, service: &str) -> Option<Value> {
        let response = self
            .http()
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
            .http()
            .put(format!("{}/v1/kv/{key}", self.app().registry_url()))
            .body(value.to_string())
            .send()
            .await
            .expect("registry answers");
        assert_eq!(response.status(), StatusCode::OK, "PUT {key}");
    }
}

/// The client for `app`, started with `settings`.
fn client_of(app: &FlowProxy, settings: &Settings) -> ProxyClient {
    ProxyClient::new(
        app.api_address(),
        settings.http_port,
        settings.data_dir.clone(),
    )
}

impl Deref for TestProxy {
    type Target = ProxyClient;

    fn deref(&self) -> &ProxyClient {
        &self.client
    }
}

impl Drop for TestProxy {
    fn drop(&mut self) {
        // HAProxy children are killed when their handles drop with the runtime (kill_on_drop).
        self.app.take();
    }
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

/// A proxy already routing `/demo` of service `go-demo` to one instance, so that "nothing
/// changed" can be observed.
pub async fn proxy_routing_demo() -> (TestProxy, Backend) {
    proxy_routing_demo_with(|_| {}).await
}

/// [`proxy_routing_demo`], after `customise` has changed the settings.
pub async fn proxy_routing_demo_with(
    customise: impl FnOnce(&mut Settings),
) -> (TestProxy, Backend) {
    let proxy = TestProxy::spawn_with(customise).await;
    let backend = spawn_backend("demo").await;
    proxy
        .register_instance("go-demo", "go-demo.1", backend.port)
        .await;
    proxy
        .reconfigure_ok("serviceName=go-demo&servicePath=/demo")
        .await;
    (proxy, backend)
}

/// The token [`answers_under_the_read_rules`] sets.
pub const READ_RULES_TOKEN: &str = "read-rules-token";

/// Asks read-only endpoint `path` of two proxies with an API token, one without and one with
/// `--open-read-endpoints`: anonymous requests must get 401, then 200; requests with the token
/// 200 both times. Returns the answers given with the token, for the caller to look into.
pub async fn answers_under_the_read_rules(path: &str) -> Vec<reqwest::Response> {
    let mut answers = Vec::new();
    for open_reads in [false, true] {
        let proxy = TestProxy::spawn_with(|settings| {
            settings.api_token = Some(flow_proxy::settings::Secret::new(READ_RULES_TOKEN));
            settings.open_read_endpoints = open_reads;
        })
        .await;
        let anonymous = proxy
            .http()
            .get(proxy.api(path))
            .send()
            .await
            .expect("answers");
        let expected = if open_reads {
            StatusCode::OK
        } else {
            StatusCode::UNAUTHORIZED
        };
        assert_eq!(
            anonymous.status(),
            expected,
            "{path}, open_reads={open_reads}"
        );
        let with_token = proxy
            .http()
            .get(proxy.api(path))
            .bearer_auth(READ_RULES_TOKEN)
            .send()
            .await
            .expect("answers");
        assert_eq!(with_token.status(), StatusCode::OK, "{path} with the token");
        answers.push(with_token);
    }
    answers
}
