//! `RegistryFront`: an HTTP server on 127.0.0.1 that a flow-proxy takes for its Consul. It
//! forwards every request unchanged to a real registry, and in between it can
//!
//! - record the `X-Consul-Token` of each request, to check what flow-proxy sends;
//! - hold every request for a while before forwarding it, as a Consul under load would;
//! - play a rival writer: just before a check-and-set write (`PUT /v1/kv/…?cas=…`) reaches the
//!   registry, write another document to the same key, so that flow-proxy loses the race exactly
//!   as it would against another proxy writing at the same moment.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};

struct FrontState {
    upstream: String,
    client: reqwest::Client,
    tokens: Mutex<Vec<(String, Option<String>)>>,
    rival: Mutex<Option<Rival>>,
    delay: Mutex<std::time::Duration>,
}

/// The rival writer's plan: how many check-and-set writes it wins, and what it writes.
struct Rival {
    wins_left: usize,
    document: Vec<u8>,
}

/// The forwarding server; stops when dropped.
pub struct RegistryFront {
    address: SocketAddr,
    state: Arc<FrontState>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for RegistryFront {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl RegistryFront {
    /// Starts forwarding to the registry at `upstream` (`host:port`).
    pub async fn start(upstream: &str) -> RegistryFront {
        let state = Arc::new(FrontState {
            upstream: format!("http://{upstream}"),
            client: reqwest::Client::new(),
            tokens: Mutex::new(Vec::new()),
            rival: Mutex::new(None),
            delay: Mutex::new(std::time::Duration::ZERO),
        });
        let listener = tokio::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .await
            .expect("bind the registry front");
        let address = listener.local_addr().expect("front address");
        let app = axum::Router::new()
            .fallback(forward)
            .with_state(Arc::clone(&state));
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        RegistryFront {
            address,
            state,
            task,
        }
    }

    /// What `--consul-address` takes: `127.0.0.1:<port>`.
    pub fn address(&self) -> String {
        self.address.to_string()
    }

    /// Each request seen so far: `METHOD path` and its `X-Consul-Token` header, if any.
    pub fn tokens_seen(&self) -> Vec<(String, Option<String>)> {
        self.state.tokens.lock().expect("tokens lock").clone()
    }

    /// Holds every request that arrives from now on for `delay` before forwarding it.
    pub fn set_delay(&self, delay: std::time::Duration) {
        *self.state.delay.lock().expect("delay lock") = delay;
    }

    /// The next `wins` check-and-set writes lose to a rival that writes `document` to the same
    /// key first.
    pub fn rival_wins_next(&self, wins: usize, document: &str) {
        *self.state.rival.lock().expect("rival lock") = Some(Rival {
            wins_left: wins,
            document: document.as_bytes().to_vec(),
        });
    }
}

async fn forward(
    State(state): State<Arc<FrontState>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let token = headers
        .get("x-consul-token")
        .and_then(|value| value.to_str().ok())
        .map(str::to_string);
    state
        .tokens
        .lock()
        .expect("tokens lock")
        .push((format!("{method} {}", uri.path()), token));

    let delay = *state.delay.lock().expect("delay lock");
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    let path_and_query = uri.path_and_query().map_or("/", |pq| pq.as_str());
    let is_cas_write = method == Method::PUT
        && uri.path().starts_with("/v1/kv/")
        && uri.query().is_some_and(|query| query.contains("cas="));
    if is_cas_write {
        let rival_document = {
            let mut rival = state.rival.lock().expect("rival lock");
            match rival.as_mut() {
                Some(plan) if plan.wins_left > 0 => {
                    plan.wins_left -= 1;
                    Some(plan.document.clone())
                }
                _ => None,
            }
        };
        if let Some(document) = rival_document {
            let rival_write = state
                .client
                .put(format!("{}{}", state.upstream, uri.path()))
                .body(document)
                .send()
                .await
                .expect("the rival's write reaches the registry");
            assert!(rival_write.status().is_success(), "the rival's write");
        }
    }

    let mut request = state
        .client
        .request(method, format!("{}{path_and_query}", state.upstream))
        .body(body);
    for (name, value) in &headers {
        if name != axum::http::header::HOST {
            request = request.header(name, value);
        }
    }
    match request.send().await {
        Ok(answer) => {
            let status = answer.status();
            let mut response_headers = HeaderMap::new();
            for (name, value) in answer.headers() {
                if name != axum::http::header::CONTENT_LENGTH
                    && name != axum::http::header::TRANSFER_ENCODING
                {
                    response_headers.insert(name.clone(), value.clone());
                }
            }
            let body = answer.bytes().await.unwrap_or_default();
            (status, response_headers, body).into_response()
        }
        Err(error) => (StatusCode::BAD_GATEWAY, error.to_string()).into_response(),
    }
}
