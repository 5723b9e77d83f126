//! Talking to a Consul with ACLs: the token reaches Consul with every request (from the flag or
//! from `CONSUL_HTTP_TOKEN`), and a refusal is reported as the ACL problem it is.

use reqwest::StatusCode;

use crate::fleet::{eventually, Fault, ProxyOptions, ProxyProcess, SharedRegistry};
use crate::front::RegistryFront;
use crate::helpers::spawn_backend;

/// Routes `web` through `proxy` and returns the requests the front saw, with their tokens.
async fn route_web_through(
    proxy: &ProxyProcess,
    front: &RegistryFront,
) -> Vec<(String, Option<String>)> {
    let (status, body) = proxy.reconfigure("serviceName=web&servicePath=/web").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(
        proxy.get_through_proxy("/web", None).await,
        (StatusCode::OK, "web /web".to_string())
    );
    front.tokens_seen()
}

fn assert_every_request_carries(seen: &[(String, Option<String>)], token: &str) {
    for request in [
        "GET /v1/kv/flow-proxy/",
        "GET /v1/health/service/web",
        "PUT /v1/kv/flow-proxy/services/web",
    ] {
        assert!(
            seen.iter().any(|(name, _)| name == request),
            "flow-proxy sent {request}: {seen:?}"
        );
    }
    let without: Vec<_> = seen
        .iter()
        .filter(|(_, sent)| sent.as_deref() != Some(token))
        .collect();
    assert!(
        without.is_empty(),
        "requests without the token: {without:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_token_flag_is_sent_as_x_consul_token_with_every_request() {
    let registry = SharedRegistry::start().await;
    let front = RegistryFront::start(&registry.address()).await;
    let web = spawn_backend("web").await;
    registry.register_instance("web", "web.1", web.port).await;
    let proxy = ProxyProcess::start(&front.address(), &["--consul-token", "s3cret-flag"]).await;

    let seen = route_web_through(&proxy, &front).await;

    assert_every_request_carries(&seen, "s3cret-flag");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_token_is_also_read_from_consul_http_token() {
    let registry = SharedRegistry::start().await;
    let front = RegistryFront::start(&registry.address()).await;
    let web = spawn_backend("web").await;
    registry.register_instance("web", "web.1", web.port).await;
    let proxy = ProxyProcess::start_with(
        &front.address(),
        ProxyOptions {
            env: vec![("CONSUL_HTTP_TOKEN".into(), "s3cret-env".into())],
            ..ProxyOptions::default()
        },
    )
    .await;

    let seen = route_web_through(&proxy, &front).await;

    assert_every_request_carries(&seen, "s3cret-env");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_403_is_reported_as_an_acl_problem_and_changes_nothing() {
    let registry = SharedRegistry::start().await;
    let proxy = ProxyProcess::start(&registry.address(), &["--consul-token", "too-weak"]).await;
    let web = spawn_backend("web").await;
    let api = spawn_backend("api").await;
    registry.register_instance("web", "web.1", web.port).await;
    registry.register_instance("api", "api.1", api.port).await;
    let (status, body) = proxy.reconfigure("serviceName=web&servicePath=/web").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    // The instance follower reads a newly routed service once more and starts its change
    // detectors; a token that may not read services gets filtered (empty) answers, so the fault
    // comes after those first reads, as a token losing its rights between two changes would.
    eventually(
        "the instance follower read web and started",
        std::time::Duration::from_secs(10),
        || async {
            let counts = registry.request_counts();
            counts.get("/v1/health/service/web").copied().unwrap_or(0) >= 2
                && counts.contains_key("/v1/health/state/any")
                && counts.contains_key("/v1/catalog/services")
        },
    )
    .await;
    let config_before = proxy.config().await;

    registry.set_fault(Some(Fault::PermissionDenied));
    // A service forwarding to a fixed host reads no instances (a filtered instance read is
    // refused before anything is written: `consul_filtered`), so the refusal is the KV write's.
    let (status, body) = proxy
        .reconfigure("serviceName=api&servicePath=/api&outboundHostname=127.0.0.1&port=80")
        .await;

    assert_eq!(status, StatusCode::BAD_GATEWAY, "{body}");
    assert_eq!(body["Status"], "NOK");
    let message = body["Message"].as_str().unwrap_or_default();
    assert!(
        message.contains("ACL") && message.contains("--consul-token"),
        "the message names the ACL problem and the token: {message}"
    );
    assert!(
        message.contains("Permission denied"),
        "Consul's own words: {message}"
    );
    assert!(!message.contains("unreachable"), "{message}");
    assert_eq!(proxy.config().await, config_before, "haproxy.cfg unchanged");
    assert_eq!(
        proxy.get_through_proxy("/web", None).await,
        (StatusCode::OK, "web /web".to_string()),
        "HAProxy keeps serving"
    );

    registry.set_fault(None);
    assert_eq!(
        registry.stored_spec("api").await,
        None,
        "nothing was stored"
    );
    let (status, body) = proxy.reconfigure("serviceName=api&servicePath=/api").await;
    assert_eq!(status, StatusCode::OK, "{body}");
}
