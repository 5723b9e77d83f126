//! A token that loses `service:read`: Consul (1.11 and later) answers the catalog and health
//! reads with the entries it may not see left out, and says so with
//! `X-Consul-Results-Filtered-By-ACLs: true`. Such an answer is not the truth about a service's
//! instances: the routes keep the instances they have, flow-proxy says which service and why
//! (a WARN line, `/metrics`), and follows Consul again once its answers are whole. A service
//! whose instances really are gone still loses them.

use std::time::Duration;

use reqwest::StatusCode;

use crate::fleet::{eventually, Fault, ProxyProcess, SharedRegistry};
use crate::helpers::spawn_backend;
use crate::proxy_client::http_client;

/// The token every proxy here presents: Consul marks filtered answers only for a token that is
/// not the anonymous one.
const TOKEN: &str = "flow-proxy-token";

/// Consul's header on a list its ACLs filtered.
const FILTERED: &str = "x-consul-results-filtered-by-acls";

/// How long the follower may take to read, retry (its backoff reaches a few seconds while the
/// fault lasts) and apply.
const FOLLOW: Duration = Duration::from_secs(20);

/// Requests per look: round robin over two servers answers from each at least once.
const SAMPLE: usize = 6;

/// `flow_proxy_registry_errors_total` on the proxy's `/metrics`.
async fn registry_errors(proxy: &ProxyProcess) -> f64 {
    let text = proxy
        .http()
        .get(proxy.api("/metrics"))
        .send()
        .await
        .expect("/metrics answers")
        .text()
        .await
        .expect("body");
    text.lines()
        .find_map(|line| line.strip_prefix("flow_proxy_registry_errors_total "))
        .and_then(|value| value.trim().parse().ok())
        .unwrap_or_else(|| panic!("no registry error counter in /metrics:\n{text}"))
}

/// How many times the proxy read `/v1/health/service/<service>`.
fn reads_of(registry: &SharedRegistry, service: &str) -> u64 {
    registry
        .request_counts()
        .get(&format!("/v1/health/service/{service}"))
        .copied()
        .unwrap_or(0)
}

/// A proxy with the token routing `/web` to `web.1` (backend "one"), once its instance
/// follower has read web and started its change detectors.
async fn web_routed_to_one(registry: &SharedRegistry, one_port: u16) -> ProxyProcess {
    registry.register_instance("web", "web.1", one_port).await;
    let proxy = ProxyProcess::start(&registry.address(), &["--consul-token", TOKEN]).await;
    proxy
        .reconfigure_ok("serviceName=web&servicePath=/web")
        .await;
    eventually(
        "the instance follower read web and started",
        FOLLOW,
        || async {
            let counts = registry.request_counts();
            reads_of(registry, "web") >= 2
                && counts.contains_key("/v1/health/state/any")
                && counts.contains_key("/v1/catalog/services")
        },
    )
    .await;
    assert_eq!(proxy.names_answering("/web", None, 2).await, ["one"; 2]);
    proxy
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_filtered_answer_keeps_the_routed_instances_until_consul_answers_whole_again() {
    let registry = SharedRegistry::start().await;
    let one = spawn_backend("one").await;
    let two = spawn_backend("two").await;
    let proxy = web_routed_to_one(&registry, one.port).await;
    let errors_before = registry_errors(&proxy).await;

    registry.set_fault(Some(Fault::ServiceReadDenied));
    let reads_before = reads_of(&registry, "web");
    // A change in Consul wakes the follower, whose reads of web now come back filtered.
    registry.register_instance("web", "web.2", two.port).await;
    eventually(
        "the follower read web again and counted the filtered answer",
        FOLLOW,
        || async {
            reads_of(&registry, "web") > reads_before
                && registry_errors(&proxy).await > errors_before
        },
    )
    .await;

    assert_eq!(
        proxy.names_answering("/web", None, SAMPLE).await,
        ["one"; SAMPLE],
        "web keeps the instance it routed (neither emptied nor changed by a filtered answer)"
    );
    let log = proxy.log();
    let warning = log
        .lines()
        .find(|line| line.contains("WARN") && line.contains("X-Consul-Results-Filtered-By-ACLs"))
        .unwrap_or_else(|| panic!("a WARN line names the filtered answer:\n{log}"));
    assert!(warning.contains("`web`"), "it names the service: {warning}");

    registry.set_fault(None);
    eventually(
        "once Consul answers whole, the instance registered meanwhile is served",
        FOLLOW,
        || async {
            proxy
                .names_answering("/web", None, SAMPLE)
                .await
                .contains(&"two".to_string())
        },
    )
    .await;

    registry.deregister_instance("web.1").await;
    eventually("a later deregistration is applied", FOLLOW, || async {
        proxy.names_answering("/web", None, SAMPLE).await == ["two"; SAMPLE]
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unfiltered_empty_answer_still_empties_the_service() {
    let registry = SharedRegistry::start().await;
    let one = spawn_backend("one").await;
    let proxy = web_routed_to_one(&registry, one.port).await;

    // The backend keeps running: only Consul says the instance is gone.
    registry.deregister_instance("web.1").await;

    eventually("web has no instance left", FOLLOW, || async {
        proxy.get_through_proxy("/web", None).await.0 == StatusCode::SERVICE_UNAVAILABLE
    })
    .await;
    let config = proxy.config().await;
    assert!(
        !config.contains(&format!("127.0.0.1:{}", one.port)),
        "/config no longer lists the instance:\n{config}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reconfigure_whose_instances_are_filtered_is_refused_as_an_acl_problem() {
    let registry = SharedRegistry::start().await;
    let one = spawn_backend("one").await;
    let proxy = web_routed_to_one(&registry, one.port).await;
    let config_before = proxy.config().await;

    registry.set_fault(Some(Fault::ServiceReadDenied));
    // The same spec again: a reconfigure reads the service's instances.
    let (status, body) = proxy.reconfigure("serviceName=web&servicePath=/web").await;

    assert_eq!(status, StatusCode::BAD_GATEWAY, "{body}");
    let message = body["Message"].as_str().unwrap_or_default();
    assert!(
        message.contains("X-Consul-Results-Filtered-By-ACLs") && message.contains("--consul-token"),
        "the message names the filtering and the token: {message}"
    );
    assert_eq!(proxy.config().await, config_before, "haproxy.cfg unchanged");
    assert_eq!(proxy.names_answering("/web", None, 2).await, ["one"; 2]);
}

/// `GET <path>` on the registry with or without a token: status, whether the answer says it was
/// filtered, and the body.
async fn read(registry: &SharedRegistry, path: &str, token: bool) -> (StatusCode, bool, String) {
    let mut request = http_client().get(format!("{}{path}", registry.url()));
    if token {
        request = request.header("X-Consul-Token", TOKEN);
    }
    let response = request.send().await.expect("the registry answers");
    let status = response.status();
    let filtered = response
        .headers()
        .get(FILTERED)
        .is_some_and(|value| value == "true");
    (status, filtered, response.text().await.expect("body"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_embedded_registry_marks_filtered_lists_where_consul_does() {
    let registry = SharedRegistry::start().await;
    registry
        .register_instance_with_ttl_check("web", "web.1", 8080)
        .await;
    registry.set_fault(Some(Fault::ServiceReadDenied));

    for path in [
        "/v1/health/service/web?passing",
        "/v1/catalog/service/web",
        "/v1/health/checks/web",
    ] {
        assert_eq!(
            read(&registry, path, true).await,
            (StatusCode::OK, true, "[]".to_string()),
            "{path}: web's entries left out, and said so"
        );
    }
    assert_eq!(
        read(&registry, "/v1/catalog/services", true).await,
        (StatusCode::OK, true, "{}".to_string())
    );
    assert_eq!(
        read(&registry, "/v1/agent/services", true).await,
        (StatusCode::OK, true, "{}".to_string())
    );
    // Nothing left out: an unknown service, and the nodes a token with node:read still sees.
    assert_eq!(
        read(&registry, "/v1/health/service/nothing?passing", true).await,
        (StatusCode::OK, false, "[]".to_string())
    );
    let (status, filtered, nodes) = read(&registry, "/v1/catalog/nodes", true).await;
    assert_eq!((status, filtered), (StatusCode::OK, false), "{nodes}");
    assert_ne!(nodes, "[]");
    // The node check stays, the web's checks go: filtered.
    let (_, filtered, checks) = read(&registry, "/v1/health/state/any", true).await;
    assert!(filtered && checks.contains("serfHealth"), "{checks}");
    // The anonymous token gets the same answers unmarked (Consul's maskResultsFilteredByACLs).
    assert_eq!(
        read(&registry, "/v1/health/service/web?passing", false).await,
        (StatusCode::OK, false, "[]".to_string())
    );
    // KV is still readable: only service:read was lost.
    assert_eq!(
        read(&registry, "/v1/kv/missing", true).await.0,
        StatusCode::NOT_FOUND
    );

    registry.set_fault(Some(Fault::PermissionDenied));
    let (_, filtered, nodes) = read(&registry, "/v1/catalog/nodes", true).await;
    assert!(
        filtered && nodes == "[]",
        "without node:read the node goes too: {nodes}"
    );

    registry.set_fault(None);
    let (status, filtered, body) = read(&registry, "/v1/health/service/web?passing", true).await;
    assert_eq!((status, filtered), (StatusCode::OK, false));
    assert!(body.contains("web.1"), "{body}");
}
