//! `ProxyClient`: how a test talks to one running flow-proxy from the outside, whichever way it
//! was started (in-process as a [`TestProxy`](crate::helpers::TestProxy), or as the binary in a
//! [`ProxyProcess`](crate::fleet::ProxyProcess)). It owns the calls to the API (`reconfigure`,
//! `remove`, `/config`, `/services`), requests through HAProxy, and the question "which HAProxy
//! process serves now" on its stats socket. Both harnesses hold one and deref to it.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use reqwest::StatusCode;
use serde_json::Value;

/// The HTTP client every harness uses: one connection per request, so that HAProxy's round robin
/// is visible request by request and a stopped server is seen at once, not through a pooled
/// connection; and a bound on every request.
pub fn http_client() -> reqwest::Client {
    reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .timeout(Duration::from_secs(20))
        .build()
        .expect("HTTP client")
}

/// The addresses of one flow-proxy (its API, its HAProxy's HTTP port, its data directory) and
/// the requests tests send it.
pub struct ProxyClient {
    http: reqwest::Client,
    api_address: SocketAddr,
    /// HAProxy's HTTP port on 127.0.0.1.
    pub http_port: u16,
    data_dir: PathBuf,
}

impl ProxyClient {
    /// A client for the flow-proxy whose API listens on `api_address`, whose HAProxy serves on
    /// 127.0.0.1:`http_port` and whose data directory is `data_dir`.
    pub fn new(api_address: SocketAddr, http_port: u16, data_dir: PathBuf) -> ProxyClient {
        ProxyClient {
            http: http_client(),
            api_address,
            http_port,
            data_dir,
        }
    }

    /// The underlying HTTP client, for requests to something else than flow-proxy (its
    /// registry, say) with the same connection behaviour.
    pub fn http(&self) -> &reqwest::Client {
        &self.http
    }

    /// Its data directory (generated haproxy.cfg, HAProxy's sockets).
    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// The URL of an API endpoint, e.g. `api("/v1/docker-flow-proxy/ping")`.
    pub fn api(&self, path_and_query: &str) -> String {
        format!("http://{}{}", self.api_address, path_and_query)
    }

    /// Sends a GET to the API and returns the status and the JSON answer.
    pub async fn api_get(&self, path_and_query: &str) -> (StatusCode, Value) {
        let response = self
            .http
            .get(self.api(path_and_query))
            .send()
            .await
            .unwrap_or_else(|error| panic!("flow-proxy's API answers {path_and_query}: {error}"));
        let status = response.status();
        let body = response.json().await.expect("API answers JSON");
        (status, body)
    }

    /// Calls `/v1/docker-flow-proxy/reconfigure?<query>`.
    pub async fn reconfigure(&self, query: &str) -> (StatusCode, Value) {
        self.api_get(&format!("/v1/docker-flow-proxy/reconfigure?{query}"))
            .await
    }

    /// Calls `/v1/docker-flow-proxy/reconfigure?<query>` and asserts that it was applied (200).
    pub async fn reconfigure_ok(&self, query: &str) {
        let (status, body) = self.reconfigure(query).await;
        assert_eq!(status, StatusCode::OK, "reconfigure?{query}: {body}");
    }

    /// Asserts that each `<base>&<extra>` reconfigure of `cases` (`extra`, `parameter`) is
    /// refused with 400 and a message naming `` `parameter` ``.
    pub async fn assert_each_refused(&self, base: &str, cases: &[(&str, &str)]) {
        for (extra, parameter) in cases {
            let query = format!("{base}&{extra}");
            let (status, answer) = self.reconfigure(&query).await;
            assert_eq!(status, StatusCode::BAD_REQUEST, "{query}: {answer}");
            let message = answer["Message"].as_str().unwrap_or_default();
            assert!(
                message.contains(&format!("`{parameter}`")),
                "{query}: the answer names `{parameter}`: {message}"
            );
        }
    }

    /// Calls `/v1/docker-flow-proxy/remove?<query>`.
    pub async fn remove(&self, query: &str) -> (StatusCode, Value) {
        self.api_get(&format!("/v1/docker-flow-proxy/remove?{query}"))
            .await
    }

    /// The haproxy.cfg its HAProxy runs now, as `/config` shows it.
    pub async fn config(&self) -> String {
        let response = self
            .http
            .get(self.api("/v1/docker-flow-proxy/config"))
            .send()
            .await
            .expect("flow-proxy's API answers /config");
        assert_eq!(response.status(), StatusCode::OK, "GET /config");
        response.text().await.expect("config text")
    }

    /// A file of its data directory (`haproxy.cfg`, `maps/http-1.map`) as it is once the live
    /// files a runtime change queued are written: `/config` answers after they are.
    pub async fn live_file(&self, relative: &str) -> String {
        self.config().await;
        std::fs::read_to_string(self.data_dir.join(relative))
            .unwrap_or_else(|error| panic!("{relative} in the data directory: {error}"))
    }

    /// The routed specs as `/services` lists them.
    pub async fn services(&self) -> Value {
        let (status, body) = self.api_get("/v1/docker-flow-proxy/services").await;
        assert_eq!(status, StatusCode::OK, "GET /services: {body}");
        body
    }

    /// Sends `GET <path>` through its HAProxy (with a Host header when given); status and body.
    pub async fn get_through_proxy(&self, path: &str, host: Option<&str>) -> (StatusCode, String) {
        let mut request = self
            .http
            .get(format!("http://127.0.0.1:{}{}", self.http_port, path));
        if let Some(host) = host {
            request = request.header(reqwest::header::HOST, host);
        }
        let response = request
            .send()
            .await
            .unwrap_or_else(|error| panic!("HAProxy answers GET {path}: {error}"));
        let status = response.status();
        (status, response.text().await.expect("body"))
    }

    /// Asks `path` through its HAProxy `count` times (with a Host header when given; one
    /// connection each, so HAProxy's round robin is visible request by request) and returns the
    /// backend names that answered, in order. Every answer must be 200: a request HAProxy fails
    /// is a failure, not a sample.
    pub async fn names_answering(
        &self,
        path: &str,
        host: Option<&str>,
        count: usize,
    ) -> Vec<String> {
        let mut names = Vec::with_capacity(count);
        for _ in 0..count {
            let (status, body) = self.get_through_proxy(path, host).await;
            assert_eq!(status, StatusCode::OK, "GET {path} through HAProxy: {body}");
            names.push(body.split(' ').next().unwrap_or_default().to_string());
        }
        names
    }

    /// The PID of the HAProxy process serving now, asked on its stats socket (`None` when it
    /// does not answer): unchanged means HAProxy was not reloaded.
    pub async fn haproxy_pid(&self) -> Option<u32> {
        let socket = self
            .data_dir
            .canonicalize()
            .expect("the data directory exists")
            .join("haproxy.sock");
        flow_proxy::haproxy::serving_pid(&socket).await
    }

    /// What HAProxy runs now, to check later that a refused change changed nothing. HAProxy must
    /// answer on its stats socket.
    pub async fn snapshot(&self) -> Snapshot {
        let haproxy_pid = self.haproxy_pid().await;
        assert!(haproxy_pid.is_some(), "HAProxy answers on its stats socket");
        Snapshot {
            config: self.config().await,
            haproxy_pid,
        }
    }

    /// Asserts that haproxy.cfg is byte-identical and HAProxy was not reloaded since `before`.
    pub async fn assert_unchanged_since(&self, before: &Snapshot) {
        assert_eq!(
            self.config().await,
            before.config,
            "haproxy.cfg is byte-identical"
        );
        assert_eq!(
            self.haproxy_pid().await,
            before.haproxy_pid,
            "HAProxy was not reloaded"
        );
    }
}

/// The running configuration and HAProxy process at one moment.
pub struct Snapshot {
    config: String,
    haproxy_pid: Option<u32>,
}
