//! Running out of file descriptors must not kill the front door: flow-proxy raises its soft
//! open-files limit to the hard limit at start, so that routing 1,000 services with the embedded
//! registry (a socket on each side of every instance watch) works under the common default soft
//! limit of 1,024.

use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use futures::StreamExt;
use reqwest::StatusCode;
use serde_json::json;

use crate::fleet::{eventually, open_files, ProxyOptions, ProxyProcess, KV_PREFIX};
use crate::helpers::{free_port, spawn_backend};
use crate::proxy_client::http_client;

/// How many services the test routes.
const SERVICES: usize = 1_000;

/// The soft limit the process starts with: the usual default of `ulimit -n`.
const SOFT_LIMIT: u64 = 1_024;

/// The services whose own backend answers, to check that requests reach them.
const SAMPLED: [usize; 5] = [0, 250, 500, 750, 999];

/// Registry writes in flight at once while filling it.
const CONCURRENT_WRITES: usize = 8;

/// How long routing all the services may take after their specs are stored.
const ROUTED_TIMEOUT: Duration = Duration::from_secs(60);

fn service(index: usize) -> String {
    format!("svc-{index}")
}

/// Sends `PUT <url>` with `body`; asserts Consul's 200.
async fn put(client: &reqwest::Client, url: String, body: Vec<u8>) {
    let response = client
        .put(&url)
        .body(body)
        .send()
        .await
        .unwrap_or_else(|error| panic!("the registry answers PUT {url}: {error}"));
    assert_eq!(response.status(), StatusCode::OK, "PUT {url}");
}

fn registration(service: &str, id: &str, port: u16) -> Vec<u8> {
    serde_json::to_vec(&json!({
        "ID": id, "Name": service, "Port": port, "Address": "127.0.0.1",
        "Check": null, "Checks": null
    }))
    .expect("registration JSON")
}

/// The spec a reconfigure with `serviceName=<service>&servicePath=/<service>` stores.
fn stored_spec(service: &str) -> Vec<u8> {
    serde_json::to_vec(&json!({
        "ServiceName": service,
        "ServiceDest": [{ "Index": 0, "ServicePath": [format!("/{service}")] }]
    }))
    .expect("spec JSON")
}

/// The number of open descriptors of `pid` once it has not grown for a second (at most 30 s).
async fn settled_open_files(pid: u32) -> usize {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let mut last = open_files(pid).expect("flow-proxy's open files");
    loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let now = open_files(pid).expect("flow-proxy's open files");
        if now <= last || tokio::time::Instant::now() >= deadline {
            return now.max(last);
        }
        last = now;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_services_are_routed_under_a_soft_limit_of_1024_open_files() {
    let shared = spawn_backend("shared").await;
    let mut sampled_backends = Vec::new();
    for index in SAMPLED {
        sampled_backends.push((index, spawn_backend(&service(index)).await));
    }
    let registry_address = SocketAddr::from((Ipv4Addr::LOCALHOST, free_port()));
    let registry = format!("http://{registry_address}");
    let proxy = ProxyProcess::start_with(
        "",
        ProxyOptions {
            embedded_registry: Some(registry_address),
            open_files_limit: (Some(SOFT_LIMIT), None),
            ..ProxyOptions::default()
        },
    )
    .await;
    let log = proxy.log();
    assert!(
        log.contains(&format!("open files limit raised from {SOFT_LIMIT} to")),
        "flow-proxy says it raised its limit: {log}"
    );
    let idle_open_files = open_files(proxy.pid()).expect("flow-proxy's open files");

    // The sampled services get an instance (their own backend; svc-123 the shared one); then
    // every service gets its spec, as a reconfigure through any proxy sharing this registry
    // would store it. Each routed service gets an instance watch, with or without instances.
    let client = http_client();
    let started = tokio::time::Instant::now();
    let mut instances: Vec<(String, u16)> = sampled_backends
        .iter()
        .map(|(index, backend)| (service(*index), backend.port))
        .collect();
    instances.push((service(123), shared.port));
    for (name, port) in &instances {
        put(
            &client,
            format!("{registry}/v1/agent/service/register"),
            registration(name, &format!("{name}-1"), *port),
        )
        .await;
    }
    futures::stream::iter(0..SERVICES)
        .map(|index| {
            let client = &client;
            let registry = &registry;
            async move {
                let name = service(index);
                put(
                    client,
                    format!("{registry}/v1/kv/{KV_PREFIX}/services/{name}"),
                    stored_spec(&name),
                )
                .await;
            }
        })
        .buffer_unordered(CONCURRENT_WRITES)
        .collect::<Vec<()>>()
        .await;
    let filled = started.elapsed();

    let routed_after = eventually(
        "flow-proxy routes all the stored services",
        ROUTED_TIMEOUT,
        || async {
            let (status, services) = proxy.api_get("/v1/docker-flow-proxy/services").await;
            status == StatusCode::OK && services.as_array().map(Vec::len) == Some(SERVICES)
        },
    )
    .await;

    for (index, _) in &sampled_backends {
        let name = service(*index);
        let (status, body) = proxy
            .get_through_proxy(&format!("/{name}/hello"), None)
            .await;
        assert_eq!(
            (status, body.as_str()),
            (StatusCode::OK, format!("{name} /{name}/hello").as_str()),
            "a request to /{name} reaches its backend"
        );
    }
    let (status, body) = proxy.get_through_proxy("/svc-123/x", None).await;
    assert_eq!(
        (status, body.as_str()),
        (StatusCode::OK, "shared /svc-123/x")
    );
    let (status, _) = proxy.get_through_proxy("/svc-124/x", None).await;
    assert_eq!(
        status,
        StatusCode::SERVICE_UNAVAILABLE,
        "a routed service without instances answers 503"
    );

    // Count the descriptors the 1,000 instance watches cost, once they are all open (the count
    // stops growing).
    let routed_open_files = settled_open_files(proxy.pid()).await;

    // A new change still works…
    let late = spawn_backend("late").await;
    put(
        &client,
        format!("{registry}/v1/agent/service/register"),
        registration("late", "late-1", late.port),
    )
    .await;
    let (status, body) = proxy
        .reconfigure("serviceName=late&servicePath=/late")
        .await;
    assert_eq!(
        status,
        StatusCode::OK,
        "reconfigure with 1,000 routed: {body}"
    );
    let (status, body) = proxy.get_through_proxy("/late/x", None).await;
    assert_eq!((status, body.as_str()), (StatusCode::OK, "late /late/x"));

    // …and so does following an instance change of one of the 1,000.
    let moved = spawn_backend("moved").await;
    put(
        &client,
        format!("{registry}/v1/agent/service/register"),
        registration("svc-500", "svc-500-1", moved.port),
    )
    .await;
    eventually(
        "the moved instance of svc-500 is served",
        Duration::from_secs(20),
        || async {
            proxy.get_through_proxy("/svc-500/x", None).await
                == (StatusCode::OK, "moved /svc-500/x".to_string())
        },
    )
    .await;

    let per_service = (routed_open_files.saturating_sub(idle_open_files)) as f64 / SERVICES as f64;
    println!(
        "open files: {idle_open_files} idle, {routed_open_files} with {SERVICES} routed services \
         ({per_service:.2} per service, embedded registry); registry filled in {filled:?}, all \
         routed {routed_after:?} later"
    );
    assert!(
        routed_open_files > SOFT_LIMIT as usize,
        "the test needs more descriptors than the soft limit it started with: \
         {routed_open_files}"
    );
}
