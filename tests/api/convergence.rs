//! Several proxies, one Consul: a change made through any proxy reaches every other one through
//! the stored specs (blocking queries on `<kv-prefix>/services/`), with no call between proxies,
//! and concurrent writes never leave two proxies disagreeing.

use std::time::Duration;

use reqwest::StatusCode;
use serde_json::Value;

use crate::fleet::{eventually, ProxyProcess, SharedRegistry};
use crate::front::RegistryFront;
use crate::helpers::spawn_backend;

/// The bound the issue sets for a change to reach another proxy.
const CONVERGENCE: Duration = Duration::from_secs(1);

/// The body `GET <path>` gets through the proxy's HAProxy, or its status when not 200.
async fn answer(proxy: &ProxyProcess, path: &str) -> String {
    match proxy.get_through_proxy(path, None).await {
        (StatusCode::OK, body) => body,
        (status, _) => status.to_string(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reconfigure_or_remove_on_one_proxy_reaches_the_other_within_a_second() {
    let registry = SharedRegistry::start().await;
    let address = registry.address();
    let (a, b) = tokio::join!(
        ProxyProcess::start(&address, &[]),
        ProxyProcess::start(&address, &[])
    );
    let web = spawn_backend("web").await;
    registry.register_instance("web", "web.1", web.port).await;

    let (status, body) = a
        .reconfigure("serviceName=web&servicePath=/web&serviceDomain=example.com")
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let routed_on_a = a.services().await;
    eventually(
        "B serves and lists the route set on A",
        CONVERGENCE,
        || async {
            b.get_through_proxy("/web", Some("example.com")).await
                == (StatusCode::OK, "web /web".to_string())
                && b.services().await == routed_on_a
        },
    )
    .await;

    let (status, body) = a.remove("serviceName=web").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    eventually("B drops the route removed on A", CONVERGENCE, || async {
        b.get_through_proxy("/web", Some("example.com")).await.0 == StatusCode::SERVICE_UNAVAILABLE
            && b.services().await == Value::Array(Vec::new())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_reconfigures_of_one_service_on_two_proxies_end_in_agreement() {
    let registry = SharedRegistry::start().await;
    let address = registry.address();
    let (a, b) = tokio::join!(
        ProxyProcess::start(&address, &[]),
        ProxyProcess::start(&address, &[])
    );
    let web = spawn_backend("web").await;
    registry.register_instance("web", "web.1", web.port).await;

    for round in 0..8 {
        let on_a = format!("serviceName=web&servicePath=/from-a-{round}");
        let on_b = format!("serviceName=web&servicePath=/from-b-{round}");
        let (answer_a, answer_b) = tokio::join!(a.reconfigure(&on_a), b.reconfigure(&on_b));
        for (status, body) in [answer_a, answer_b] {
            assert!(
                status == StatusCode::OK || status == StatusCode::CONFLICT,
                "round {round}: each call wins or is told it lost: {status} {body}"
            );
        }
        eventually(
            &format!("round {round}: A, B and the stored spec agree"),
            CONVERGENCE,
            || async {
                let Some(stored) = registry.stored_spec("web").await else {
                    return false;
                };
                let (on_a, on_b) = tokio::join!(a.services(), b.services());
                on_a == on_b && on_a.get(0) == Some(&stored)
            },
        )
        .await;
        let stored = registry.stored_spec("web").await.expect("a stored spec");
        let path = stored["ServiceDest"][0]["ServicePath"][0]
            .as_str()
            .expect("a path")
            .to_string();
        assert!(
            path == format!("/from-a-{round}") || path == format!("/from-b-{round}"),
            "round {round}: one of this round's writes won: {path}"
        );
        let expected = format!("web {path}");
        assert_eq!(
            answer(&a, &path).await,
            expected,
            "round {round}: A serves it"
        );
        assert_eq!(
            answer(&b, &path).await,
            expected,
            "round {round}: B serves it"
        );
    }
}

/// The document a rival proxy writes: a valid spec of `web` on `path`.
fn rival_spec(path: &str) -> String {
    serde_json::json!({
        "ServiceName": "web", "ServiceColor": null, "AclName": null, "SkipCheck": false,
        "PathType": "path_beg",
        "ServiceDest": [{"Index": 0, "ServicePath": [path], "ServiceDomain": [], "PathType": null,
                         "Port": null, "SrcPort": null, "ReqMode": "http"}]
    })
    .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_that_loses_a_race_is_read_again_and_retried() {
    let registry = SharedRegistry::start().await;
    let front = RegistryFront::start(&registry.address()).await;
    let proxy = ProxyProcess::start(&front.address(), &[]).await;
    let web = spawn_backend("web").await;
    registry.register_instance("web", "web.1", web.port).await;

    front.rival_wins_next(2, &rival_spec("/rival"));
    let (status, body) = proxy.reconfigure("serviceName=web&servicePath=/ours").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let stored = registry.stored_spec("web").await.expect("a stored spec");
    assert_eq!(
        stored["ServiceDest"][0]["ServicePath"][0], "/ours",
        "the retried write replaced the rival's"
    );
    assert_eq!(answer(&proxy, "/ours").await, "web /ours");
    // The rival's versions were overtaken: the proxy must not fall back to one of them.
    eventually(
        "the proxy's routes match the stored spec",
        CONVERGENCE,
        || async { proxy.services().await.get(0) == Some(&stored) },
    )
    .await;
    assert_eq!(answer(&proxy, "/rival").await, "503 Service Unavailable");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_that_keeps_losing_races_is_answered_409_and_the_rivals_spec_stands() {
    let registry = SharedRegistry::start().await;
    let front = RegistryFront::start(&registry.address()).await;
    let proxy = ProxyProcess::start(&front.address(), &[]).await;
    let web = spawn_backend("web").await;
    registry.register_instance("web", "web.1", web.port).await;

    front.rival_wins_next(usize::MAX, &rival_spec("/rival"));
    let (status, body) = proxy.reconfigure("serviceName=web&servicePath=/ours").await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    assert_eq!(body["Status"], "NOK");
    let message = body["Message"].as_str().unwrap_or_default();
    assert!(
        message.contains("changed in Consul by another writer"),
        "{message}"
    );
    let stored = registry.stored_spec("web").await.expect("the rival's spec");
    assert_eq!(stored["ServiceDest"][0]["ServicePath"][0], "/rival");
    assert_eq!(
        answer(&proxy, "/ours").await,
        "503 Service Unavailable",
        "the refused request routed nothing"
    );
    eventually(
        "the proxy follows the spec that won",
        CONVERGENCE,
        || async { answer(&proxy, "/rival").await == "web /rival" },
    )
    .await;
}
