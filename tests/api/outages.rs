//! When Consul is down: HAProxy keeps serving the last good configuration, changes are refused
//! with Consul's own reason and change nothing, and once Consul answers again flow-proxy resyncs
//! by itself. Several `--consul-address` values are tried in order.
//!
//! Coming back is bounded by the watches' backoff: after a failed query a watch pauses between
//! half and all of a step that starts at 0.25 s and doubles up to 10 s, so a watch may sleep up
//! to 10 s before it asks a Consul that is back again. [`RESYNC`] allows for that pause plus
//! reading, rendering and reloading.

use std::time::Duration;

use reqwest::StatusCode;
use serde_json::Value;
use tempfile::TempDir;
use tokio::time::Instant;

use crate::fleet::{eventually, Fault, ProxyOptions, ProxyProcess, SharedRegistry};
use crate::helpers::{free_port, spawn_backend};

/// How long a change may take to reach HAProxy once Consul is back: the 10 s backoff cap plus
/// a margin for the read and the reload.
const RESYNC: Duration = Duration::from_secs(15);

/// The bound for an instance change when Consul is healthy.
const LIVE: Duration = Duration::from_secs(1);

/// How long a watch may take to notice an outage and log it (a few of its first, short pauses).
const NOTICE: Duration = Duration::from_secs(5);

/// The warning the instance follower's catalog detector logs when a query to Consul fails (the
/// instances of `web` are followed through it).
const WATCH_FAILED: &str = "watching the catalog of services failed";

/// Whether the backend called `name` answers any of six requests for `path`.
async fn answers(proxy: &ProxyProcess, path: &str, name: &str) -> bool {
    proxy
        .names_answering(path, None, 6)
        .await
        .iter()
        .any(|answered| answered == name)
}

/// Starts a proxy whose log level is pinned to `info` (whatever `RUST_LOG` the tests run with),
/// because these tests read its warnings to know that a watch has seen the outage.
async fn start_proxy_logging_info(consul_address: &str) -> ProxyProcess {
    ProxyProcess::start_with(
        consul_address,
        ProxyOptions {
            env: vec![("RUST_LOG".into(), "info".into())],
            ..ProxyOptions::default()
        },
    )
    .await
}

/// Waits until `web`'s instance watch has logged a failed query whose error says `reason`: from
/// then on it is pausing and retrying, so what follows exercises its way back, not a blocking
/// query that happened to outlive the outage.
async fn until_the_instance_watch_failed(proxy: &ProxyProcess, reason: &str) {
    eventually(
        &format!("the instance watch of `web` reports `{reason}`"),
        NOTICE,
        || async {
            proxy
                .log()
                .lines()
                .any(|line| line.contains(WATCH_FAILED) && line.contains(reason))
        },
    )
    .await;
}

/// Registers a second instance of `web` (the backend `two` on `port`) and waits until HAProxy
/// routes requests to it, within `bound` counted from the registration.
async fn register_two_and_wait_served(
    registry: &SharedRegistry,
    proxy: &ProxyProcess,
    port: u16,
    what: &str,
    bound: Duration,
) {
    let registered = Instant::now();
    registry.register_instance("web", "web.2", port).await;
    eventually(what, bound.saturating_sub(registered.elapsed()), || async {
        answers(proxy, "/web", "two").await
    })
    .await;
}

/// Asserts a 503 refusal whose message contains `reason`.
fn assert_refused(status: StatusCode, body: &Value, reason: &str) {
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert_eq!(body["Status"], "NOK", "{body}");
    let message = body["Message"].as_str().unwrap_or_default();
    assert!(
        message.contains(reason),
        "the message says `{reason}`: {message}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_consul_down_haproxy_keeps_serving_and_resyncs_when_it_is_back() {
    let mut registry = SharedRegistry::start().await;
    let proxy = start_proxy_logging_info(&registry.address()).await;
    let one = spawn_backend("one").await;
    let two = spawn_backend("two").await;
    let api = spawn_backend("api").await;
    registry.register_instance("web", "web.1", one.port).await;
    registry.register_instance("api", "api.1", api.port).await;
    proxy
        .reconfigure_ok("serviceName=web&servicePath=/web")
        .await;
    let before = proxy.snapshot().await;

    registry.stop().await;
    let (status, body) = proxy.reconfigure("serviceName=api&servicePath=/api").await;
    assert_refused(status, &body, "Consul is unreachable");
    assert!(
        body["Message"]
            .as_str()
            .unwrap_or_default()
            .contains(&registry.address()),
        "the message names the address tried: {body}"
    );
    let (status, body) = proxy.remove("serviceName=web").await;
    assert_refused(status, &body, "Consul is unreachable");
    assert_eq!(
        proxy.names_answering("/web", None, 4).await,
        ["one"; 4],
        "HAProxy keeps serving the last route"
    );
    assert_eq!(
        proxy.get_through_proxy("/api", None).await.0,
        StatusCode::SERVICE_UNAVAILABLE,
        "the refused route was not added"
    );
    proxy.assert_unchanged_since(&before).await;
    until_the_instance_watch_failed(&proxy, "Consul is unreachable").await;
    proxy.assert_unchanged_since(&before).await;

    registry.restart().await;
    register_two_and_wait_served(
        &registry,
        &proxy,
        two.port,
        "an instance registered after Consul came back answers",
        RESYNC,
    )
    .await;
    assert_eq!(
        proxy.get_through_proxy("/api", None).await.0,
        StatusCode::SERVICE_UNAVAILABLE,
        "the refused reconfigure stays refused"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_cluster_leader_changes_are_refused_and_instances_resync_once_it_is_back() {
    let registry = SharedRegistry::start().await;
    let proxy = start_proxy_logging_info(&registry.address()).await;
    let one = spawn_backend("one").await;
    let two = spawn_backend("two").await;
    let three = spawn_backend("three").await;
    let api = spawn_backend("api").await;
    registry.register_instance("web", "web.1", one.port).await;
    registry.register_instance("api", "api.1", api.port).await;
    proxy
        .reconfigure_ok("serviceName=web&servicePath=/web")
        .await;
    let before = proxy.snapshot().await;

    registry.set_fault(Some(Fault::NoLeader));
    let (status, body) = proxy.reconfigure("serviceName=api&servicePath=/api").await;
    assert_refused(status, &body, "No cluster leader");
    assert_refused(status, &body, "Consul cannot serve");
    assert_eq!(proxy.names_answering("/web", None, 4).await, ["one"; 4]);
    proxy.assert_unchanged_since(&before).await;

    // Registrator still reaches the agent without a leader. A blocking query the watch had sent
    // before the fault may still deliver this one; the watch's next query fails.
    registry.register_instance("web", "web.2", two.port).await;
    until_the_instance_watch_failed(&proxy, "No cluster leader").await;
    // From now on the watch only gets `No cluster leader`: this one can only come through a
    // resync once the leader is back.
    registry.register_instance("web", "web.3", three.port).await;
    assert!(
        !proxy
            .config()
            .await
            .contains(&format!("127.0.0.1:{}", three.port)),
        "nothing is read from a Consul without a leader"
    );

    registry.set_fault(None);
    eventually(
        "instances registered without a leader answer once it is back",
        RESYNC,
        || async {
            let names = proxy.names_answering("/web", None, 6).await;
            ["one", "two", "three"]
                .iter()
                .all(|name| names.iter().any(|answered| answered == name))
        },
    )
    .await;
    proxy
        .reconfigure_ok("serviceName=api&servicePath=/api")
        .await;
    assert_eq!(proxy.names_answering("/api", None, 2).await, ["api"; 2]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_first_address_hands_over_to_the_next() {
    let registry = SharedRegistry::start().await;
    // Bound and released: nobody listens there, so connecting is refused.
    let dead = format!("127.0.0.1:{}", free_port());
    let proxy = ProxyProcess::start(&format!("{dead},{}", registry.address()), &[]).await;
    let one = spawn_backend("one").await;
    let two = spawn_backend("two").await;
    registry.register_instance("web", "web.1", one.port).await;
    proxy
        .reconfigure_ok("serviceName=web&servicePath=/web")
        .await;
    assert_eq!(proxy.names_answering("/web", None, 2).await, ["one"; 2]);
    assert!(
        registry.stored_spec("web").await.is_some(),
        "the spec was stored through the second address"
    );

    register_two_and_wait_served(
        &registry,
        &proxy,
        two.port,
        "an instance registered behind the second address answers",
        LIVE,
    )
    .await;

    let changed = Instant::now();
    registry.deregister_instance("web.1").await;
    eventually(
        "an instance deregistered behind the second address is not routed",
        LIVE.saturating_sub(changed.elapsed()),
        || async { proxy.names_answering("/web", None, 6).await == ["two"; 6] },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_address_without_a_leader_hands_over_to_the_next() {
    let leaderless = SharedRegistry::start().await;
    leaderless.set_fault(Some(Fault::NoLeader));
    let registry = SharedRegistry::start().await;
    let proxy = ProxyProcess::start(
        &format!("{},{}", leaderless.address(), registry.address()),
        &[],
    )
    .await;
    let one = spawn_backend("one").await;
    let two = spawn_backend("two").await;
    registry.register_instance("web", "web.1", one.port).await;
    proxy
        .reconfigure_ok("serviceName=web&servicePath=/web")
        .await;
    assert_eq!(proxy.names_answering("/web", None, 2).await, ["one"; 2]);
    assert!(registry.stored_spec("web").await.is_some());

    register_two_and_wait_served(
        &registry,
        &proxy,
        two.port,
        "an instance registered behind the second address answers",
        LIVE,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proxy_started_while_consul_is_down_serves_its_last_good_config_then_resyncs() {
    let mut registry = SharedRegistry::start().await;
    let data_dir = TempDir::new().expect("a data directory kept across restarts");
    let options = ProxyOptions {
        data_dir: Some(data_dir.path().to_path_buf()),
        ..ProxyOptions::default()
    };
    let mut first = ProxyProcess::start_with(&registry.address(), options.clone()).await;
    let one = spawn_backend("one").await;
    let two = spawn_backend("two").await;
    registry.register_instance("web", "web.1", one.port).await;
    first
        .reconfigure_ok("serviceName=web&servicePath=/web")
        .await;
    let last_good = first.config().await;
    assert!(first.stop().await.success());

    registry.stop().await;
    let proxy = ProxyProcess::start_with(
        &registry.address(),
        ProxyOptions {
            http_port: Some(first.http_port),
            ..options
        },
    )
    .await;
    assert_eq!(
        proxy.names_answering("/web", None, 4).await,
        ["one"; 4],
        "HAProxy serves the last good haproxy.cfg with Consul down"
    );
    assert_eq!(proxy.config().await, last_good);
    let (status, body) = proxy.reconfigure("serviceName=api&servicePath=/api").await;
    assert_refused(status, &body, "Consul is unreachable");

    registry.restart().await;
    register_two_and_wait_served(
        &registry,
        &proxy,
        two.port,
        "an instance registered after Consul came back answers",
        RESYNC,
    )
    .await;
    assert!(
        proxy
            .names_answering("/web", None, 4)
            .await
            .contains(&"one".to_string()),
        "the restored route keeps its first instance"
    );
}
