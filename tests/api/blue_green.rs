//! `examples/blue-green.sh` run for real against a `flow-proxy` process with its own embedded
//! registry: a good green release takes the traffic, a green release that fails its direct test
//! never does, and one that fails through the proxy is rolled back to blue.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use reqwest::StatusCode;
use serde_json::{json, Value};

use crate::fleet::{ProxyOptions, ProxyProcess};
use crate::helpers::{free_port, spawn_backend};

/// How long one run of the script may take.
const SCRIPT_TIMEOUT: Duration = Duration::from_secs(120);

/// flow-proxy with its own embedded registry (the stack a single host runs), routing `/demo`
/// of go-demo to a blue instance; also returns the registry's URL.
async fn go_demo_on_blue(blue_port: u16) -> (ProxyProcess, String) {
    let registry = SocketAddr::from((Ipv4Addr::LOCALHOST, free_port()));
    let proxy = ProxyProcess::start_with(
        "",
        ProxyOptions {
            embedded_registry: Some(registry),
            ..ProxyOptions::default()
        },
    )
    .await;
    let registry_url = format!("http://{registry}");
    let registered = proxy
        .http()
        .put(format!("{registry_url}/v1/agent/service/register"))
        .json(&json!({"ID": "go-demo-blue-1", "Name": "go-demo-blue",
                      "Address": "127.0.0.1", "Port": blue_port}))
        .send()
        .await
        .expect("the embedded registry answers");
    assert_eq!(registered.status(), StatusCode::OK);
    proxy
        .reconfigure_ok("serviceName=go-demo&serviceColor=blue&servicePath=/demo")
        .await;
    (proxy, registry_url)
}

/// Runs the script for a switch of go-demo from blue to green (instance `green`), expecting
/// "green" in the answers; returns its exit code and what it wrote.
async fn cut_over(proxy: &ProxyProcess, registry_url: &str, green: SocketAddr) -> (i32, String) {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/blue-green.sh");
    let run = tokio::process::Command::new("bash")
        .arg(script)
        .args(["--service", "go-demo", "--from", "blue", "--to", "green"])
        .args(["--instance", &green.to_string()])
        .args(["--param", "servicePath=/demo"])
        .args(["--check-path", "/demo/"])
        .args(["--expect", "green"])
        .env("FLOW_PROXY_API", proxy.api(""))
        .env(
            "FLOW_PROXY_URL",
            format!("http://127.0.0.1:{}", proxy.http_port),
        )
        .env("CONSUL_HTTP_ADDR", registry_url)
        .env_remove("API_TOKEN")
        .env_remove("CONSUL_HTTP_TOKEN")
        .env_remove("VERIFY_REQUESTS")
        .kill_on_drop(true)
        .output();
    let output = tokio::time::timeout(SCRIPT_TIMEOUT, run)
        .await
        .expect("the script finishes")
        .expect("bash runs the script");
    let log = String::from_utf8_lossy(&output.stderr).into_owned();
    (output.status.code().unwrap_or(-1), log)
}

/// The instance IDs of `service` in the registry.
async fn registered(proxy: &ProxyProcess, registry_url: &str, service: &str) -> Vec<String> {
    let answer: Value = proxy
        .http()
        .get(format!("{registry_url}/v1/health/service/{service}"))
        .send()
        .await
        .expect("the embedded registry answers")
        .json()
        .await
        .expect("JSON");
    answer
        .as_array()
        .expect("a list")
        .iter()
        .map(|entry| {
            entry["Service"]["ID"]
                .as_str()
                .unwrap_or_default()
                .to_string()
        })
        .collect()
}

async fn color_routed(proxy: &ProxyProcess) -> Value {
    proxy.services().await[0]["ServiceColor"].clone()
}

#[tokio::test]
async fn a_good_green_release_takes_the_traffic() {
    let blue = spawn_backend("blue").await;
    let green = spawn_backend("green").await;
    let (proxy, registry_url) = go_demo_on_blue(blue.port).await;

    let green_address = SocketAddr::from((Ipv4Addr::LOCALHOST, green.port));
    let (code, log) = cut_over(&proxy, &registry_url, green_address).await;
    assert_eq!(code, 0, "{log}");

    assert_eq!(color_routed(&proxy).await, "green");
    for _ in 0..3 {
        let (status, body) = proxy.get_through_proxy("/demo/", None).await;
        assert_eq!((status, body.as_str()), (StatusCode::OK, "green /demo/"));
    }
    // Blue stays registered, for a quick switch back.
    assert_eq!(
        registered(&proxy, &registry_url, "go-demo-blue").await,
        ["go-demo-blue-1"]
    );
    assert_eq!(
        registered(&proxy, &registry_url, "go-demo-green")
            .await
            .len(),
        1
    );
}

#[tokio::test]
async fn a_green_release_failing_its_direct_test_never_gets_traffic() {
    let blue = spawn_backend("blue").await;
    let (proxy, registry_url) = go_demo_on_blue(blue.port).await;
    let config_before = proxy.config().await;

    // Nothing listens there: the release did not start.
    let dead = SocketAddr::from((Ipv4Addr::LOCALHOST, free_port()));
    let (code, log) = cut_over(&proxy, &registry_url, dead).await;
    assert_eq!(code, 1, "{log}");
    assert!(log.contains("fails its direct test"), "{log}");

    assert_eq!(
        proxy.config().await,
        config_before,
        "the proxy was not touched"
    );
    let (status, body) = proxy.get_through_proxy("/demo/", None).await;
    assert_eq!((status, body.as_str()), (StatusCode::OK, "blue /demo/"));
    assert!(registered(&proxy, &registry_url, "go-demo-green")
        .await
        .is_empty());
}

#[tokio::test]
async fn a_green_release_failing_through_the_proxy_is_rolled_back_to_blue() {
    let blue = spawn_backend("blue").await;
    let green = spawn_backend_failing_after_first_request("green").await;
    let (proxy, registry_url) = go_demo_on_blue(blue.port).await;

    let (code, log) = cut_over(&proxy, &registry_url, green).await;
    assert_eq!(code, 1, "{log}");
    assert!(
        log.contains("answered 500") && log.contains("rolled back"),
        "{log}"
    );

    assert_eq!(color_routed(&proxy).await, "blue");
    let (status, body) = proxy.get_through_proxy("/demo/", None).await;
    assert_eq!((status, body.as_str()), (StatusCode::OK, "blue /demo/"));
    assert!(registered(&proxy, &registry_url, "go-demo-green")
        .await
        .is_empty());
}

/// A release that passes one request (the direct test) and answers 500 from then on, as one
/// that breaks under real traffic.
async fn spawn_backend_failing_after_first_request(name: &str) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .await
        .expect("bind backend");
    let address = listener.local_addr().expect("backend address");
    let answered = Arc::new(AtomicUsize::new(0));
    let name = name.to_string();
    let app = axum::Router::new().fallback(move |uri: axum::http::Uri| {
        let answered = Arc::clone(&answered);
        let body = format!("{name} {}", uri.path());
        async move {
            if answered.fetch_add(1, Ordering::SeqCst) == 0 {
                (axum::http::StatusCode::OK, body)
            } else {
                (axum::http::StatusCode::INTERNAL_SERVER_ERROR, body)
            }
        }
    });
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    address
}
