//! The HTTP-01 challenge responder: a small HTTP server of flow-proxy's own on loopback, which
//! HAProxy's main HTTP frontend sends `/.well-known/acme-challenge/<token>` to. It answers from
//! KV (`<kv-prefix>/acme/challenges/<token>`), so a challenge started by any proxy of the fleet
//! is answered by whichever proxy the ACME server reaches.

use std::net::{Ipv4Addr, SocketAddr};

use axum::extract::{Path, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use super::AcmeError;
use crate::registry::ConsulClient;

/// Longest token answered (Let's Encrypt's are 43 characters).
const MAX_TOKEN_LEN: usize = 128;

/// The running responder.
pub struct ChallengeResponder {
    address: SocketAddr,
    shutdown: oneshot::Sender<()>,
    task: JoinHandle<std::io::Result<()>>,
}

#[derive(Clone)]
struct Lookup {
    registry: ConsulClient,
    challenges_prefix: String,
}

impl ChallengeResponder {
    /// Listens on an ephemeral loopback port.
    pub async fn start(registry: ConsulClient, kv_prefix: &str) -> Result<Self, AcmeError> {
        let listener = tokio::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .await
            .map_err(AcmeError::Bind)?;
        let address = listener.local_addr().map_err(AcmeError::Bind)?;
        let lookup = Lookup {
            registry,
            challenges_prefix: challenges_prefix(kv_prefix),
        };
        let router = Router::new()
            .route("/.well-known/acme-challenge/{token}", get(answer))
            .with_state(lookup);
        let (shutdown, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            axum::serve(listener, router)
                .with_graceful_shutdown(async move {
                    let _ = stopped.await;
                })
                .await
        });
        Ok(ChallengeResponder {
            address,
            shutdown,
            task,
        })
    }

    /// Where it listens (the ACME backend's server in haproxy.cfg).
    pub fn address(&self) -> SocketAddr {
        self.address
    }

    /// Stops listening.
    pub async fn stop(self) {
        let _ = self.shutdown.send(());
        let _ = self.task.await;
    }
}

/// `<kv-prefix>/acme/challenges/`.
pub(super) fn challenges_prefix(kv_prefix: &str) -> String {
    format!("{}/acme/challenges/", kv_prefix.trim_end_matches('/'))
}

/// Whether `token` is a plain ACME token (base64url), so it can name a KV key.
pub(super) fn is_token(token: &str) -> bool {
    !token.is_empty()
        && token.len() <= MAX_TOKEN_LEN
        && token
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_'))
}

async fn answer(State(lookup): State<Lookup>, Path(token): Path<String>) -> Response {
    if !is_token(&token) {
        return StatusCode::NOT_FOUND.into_response();
    }
    let key = format!("{}{token}", lookup.challenges_prefix);
    match lookup.registry.kv_get(&key).await {
        Ok(read) => match read.value {
            Some(entry) => (
                [(header::CONTENT_TYPE, "application/octet-stream")],
                entry.value,
            )
                .into_response(),
            None => StatusCode::NOT_FOUND.into_response(),
        },
        Err(error) => {
            tracing::warn!(%error, "reading an ACME challenge from KV failed");
            StatusCode::SERVICE_UNAVAILABLE.into_response()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::is_token;

    #[test]
    fn only_base64url_tokens_name_a_key() {
        assert!(is_token("LoqXcYV8q5ONbJQxbmR7SCTNo3tiAXDfowyjxAjEuX0"));
        for bad in ["", "../account", "a/b", "a b", "a%2Fb", &"a".repeat(129)] {
            assert!(!is_token(bad), "{bad}");
        }
    }
}
