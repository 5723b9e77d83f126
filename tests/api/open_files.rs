//! Running out of file descriptors must not kill the front door: flow-proxy raises its soft
//! open-files limit to the hard limit at start, and routing 1,000 services with the embedded
//! registry costs no descriptor per service (their instances are followed over a few
//! connections), so it works even under the common default soft limit of 1,024.

use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use futures::StreamExt;
use reqwest::StatusCode;
use serde_json::json;
use tokio::io::AsyncWriteExt;

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

/// The number of open descriptors of `pid` once it has not grown for 3 s (at most 60 s).
async fn settled_open_files(pid: u32) -> usize {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let mut highest = open_files(pid).expect("flow-proxy's open files");
    let mut grew_at = tokio::time::Instant::now();
    while grew_at.elapsed() < Duration::from_secs(3) && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(250)).await;
        let now = open_files(pid).expect("flow-proxy's open files");
        if now > highest {
            highest = now;
            grew_at = tokio::time::Instant::now();
        }
    }
    highest
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
    // would store it. Every routed service's instances are followed, with or without instances.
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

    // Count the descriptors with 1,000 routed services, once the count stops growing.
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
        routed_open_files < idle_open_files + 64,
        "following 1,000 services' instances costs no descriptor per service: {idle_open_files} \
         idle, {routed_open_files} routed"
    );
}

/// Writes the spec of `service` (routed at `/<service>`, `skipCheck=true`) into `registry`'s KV.
/// Without health checks: HAProxy reserves one descriptor for each health-checked server (every
/// server slot of a backend), which [`HARD_LIMIT`] cannot hold for hundreds of services; the
/// descriptors these tests are about are flow-proxy's own.
async fn store_spec(client: &reqwest::Client, registry: &str, service: &str) {
    let spec = serde_json::to_vec(&json!({
        "ServiceName": service,
        "SkipCheck": true,
        "ServiceDest": [{ "Index": 0, "ServicePath": [format!("/{service}")] }]
    }))
    .expect("spec JSON");
    put(
        client,
        format!("{registry}/v1/kv/{KV_PREFIX}/services/{service}"),
        spec,
    )
    .await;
}

/// The hard limit the degraded-mode tests give flow-proxy (and so its HAProxy).
const HARD_LIMIT: u64 = 256;

/// Starts flow-proxy under a hard open-files limit of [`HARD_LIMIT`] against `registry`, with
/// `--maxconn 50`: HAProxy inherits flow-proxy's limit and needs about two descriptors per
/// connection (8,220 for the default `maxconn 4096`), so this is what lets it start.
async fn start_under_hard_limit(registry: &crate::fleet::SharedRegistry) -> ProxyProcess {
    let proxy = ProxyProcess::start_with(
        &registry.address(),
        ProxyOptions {
            open_files_limit: (Some(HARD_LIMIT), Some(HARD_LIMIT)),
            extra_args: vec!["--maxconn".into(), "50".into()],
            ..ProxyOptions::default()
        },
    )
    .await;
    let log = proxy.log();
    assert!(
        log.contains(&format!("open files limit is {HARD_LIMIT}")),
        "flow-proxy logs the limit it cannot raise: {log}"
    );
    proxy
}

/// The names `/services` lists.
async fn routed_names(proxy: &ProxyProcess) -> Vec<String> {
    let services = proxy.services().await;
    services
        .as_array()
        .expect("a list")
        .iter()
        .filter_map(|spec| spec["ServiceName"].as_str().map(str::to_string))
        .collect()
}

/// Once each routed service cost a descriptor, 400 services under a hard limit of 256 left
/// services unwatched; now every one is followed and the descriptors stay free.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn more_services_than_the_hard_limit_has_descriptors_for_are_all_followed() {
    const TOO_MANY: usize = 400;
    let registry = crate::fleet::SharedRegistry::start().await;
    let proxy = start_under_hard_limit(&registry).await;
    let client = http_client();
    let url = registry.url();
    futures::stream::iter(0..TOO_MANY)
        .map(|index| {
            let (client, url) = (&client, &url);
            async move { store_spec(client, url, &service(index)).await }
        })
        .buffer_unordered(CONCURRENT_WRITES)
        .collect::<Vec<()>>()
        .await;
    eventually(
        "flow-proxy routes every stored service",
        Duration::from_secs(60),
        || async { routed_names(&proxy).await.len() == TOO_MANY },
    )
    .await;

    // The front door still works: a change is applied, and the new service's instances are
    // followed, as are those of the last service by name.
    proxy
        .reconfigure_ok("serviceName=late&servicePath=/late")
        .await;
    let late = spawn_backend("late").await;
    registry
        .register_instance("late", "late-1", late.port)
        .await;
    eventually(
        "the new instance of late is served",
        Duration::from_secs(20),
        || async {
            proxy.get_through_proxy("/late/x", None).await
                == (StatusCode::OK, "late /late/x".to_string())
        },
    )
    .await;
    let last = service(TOO_MANY - 1);
    let last_backend = spawn_backend(&last).await;
    registry
        .register_instance(&last, &format!("{last}-1"), last_backend.port)
        .await;
    eventually(
        "the new instance of the last service is served",
        Duration::from_secs(20),
        || async {
            proxy.get_through_proxy(&format!("/{last}/x"), None).await
                == (StatusCode::OK, format!("{last} /{last}/x"))
        },
    )
    .await;
    let at_most = open_files(proxy.pid()).expect("flow-proxy's open files");
    assert!(
        at_most < HARD_LIMIT as usize / 2,
        "flow-proxy kept descriptors free: {at_most} open"
    );

    // Fewer services: the rest is still followed.
    let response = client
        .delete(format!("{url}/v1/kv/{KV_PREFIX}/services/svc-?recurse"))
        .send()
        .await
        .expect("the registry deletes the specs");
    assert_eq!(response.status(), StatusCode::OK);
    eventually(
        "flow-proxy follows the removal",
        Duration::from_secs(30),
        || async { routed_names(&proxy).await == ["late"] },
    )
    .await;
    assert!(
        !proxy.log().contains("Too many open files"),
        "no descriptor ran out: {}",
        proxy.log()
    );
    println!(
        "open files: hard limit {HARD_LIMIT} with {} routed services: {at_most} open",
        TOO_MANY + 1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_connections_beyond_the_hard_limit_get_a_clear_503_and_the_api_recovers() {
    const CONNECTIONS: usize = 300;
    let registry = crate::fleet::SharedRegistry::start().await;
    let proxy = start_under_hard_limit(&registry).await;
    let steady = spawn_backend("steady").await;
    registry
        .register_instance("steady", "steady-1", steady.port)
        .await;
    proxy
        .reconfigure_ok("serviceName=steady&servicePath=/steady")
        .await;

    // Keep-alive connections that each asked for a ping hold one descriptor each in flow-proxy.
    let api_address = proxy.api("").trim_start_matches("http://").to_string();
    let mut held = Vec::with_capacity(CONNECTIONS);
    for _ in 0..CONNECTIONS {
        let mut stream = tokio::net::TcpStream::connect(&api_address)
            .await
            .expect("connect to the API");
        stream
            .write_all(b"GET /v1/docker-flow-proxy/ping HTTP/1.1\r\nHost: api\r\n\r\n")
            .await
            .expect("send a ping");
        held.push(stream);
    }
    eventually(
        "flow-proxy uses every descriptor it may",
        Duration::from_secs(30),
        || async { open_files(proxy.pid()).unwrap_or(0) >= HARD_LIMIT as usize - 1 },
    )
    .await;

    let reconfigure_late =
        proxy.api("/v1/docker-flow-proxy/reconfigure?serviceName=late&servicePath=/late");
    let client = http_client();
    let response = client
        .get(&reconfigure_late)
        .timeout(Duration::from_secs(60))
        .send()
        .await
        .expect("the API answers even out of descriptors");
    let status = response.status();
    let message = response.text().await.unwrap_or_default();
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{message}");
    assert!(
        message.contains("out of file descriptors (open files limit 256)"),
        "the answer names the cause: {message}"
    );
    let (status, body) = proxy.get_through_proxy("/steady/x", None).await;
    assert_eq!(
        (status, body.as_str()),
        (StatusCode::OK, "steady /steady/x"),
        "HAProxy serves its last good configuration"
    );

    drop(held);
    let recovered_after = eventually(
        "a reconfigure works again once the connections are closed",
        Duration::from_secs(30),
        || async {
            client
                .get(&reconfigure_late)
                .timeout(Duration::from_secs(5))
                .send()
                .await
                .is_ok_and(|response| response.status() == StatusCode::OK)
        },
    )
    .await;
    println!("open files: API recovered {recovered_after:?} after the connections closed");
}

/// What happens to the stored changes flow-proxy could not apply while it was out of
/// descriptors: a change that fails because a file cannot be written (here the candidate path is
/// made a directory; out of descriptors it is `EMFILE`) is retried until it applies, not skipped
/// as if HAProxy had rejected it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stored_change_that_fails_on_a_file_error_is_retried_until_it_applies() {
    let registry = crate::fleet::SharedRegistry::start().await;
    let backend = spawn_backend("svc-1").await;
    registry
        .register_instance("svc-1", "svc-1-a", backend.port)
        .await;
    let proxy = ProxyProcess::start(&registry.address(), &[]).await;
    let candidate = proxy
        .data_dir()
        .canonicalize()
        .expect("the data directory exists")
        .join("haproxy.cfg.candidate");
    let _ = std::fs::remove_file(&candidate);
    std::fs::create_dir(&candidate).expect("block the candidate path");

    let client = http_client();
    store_spec(&client, &registry.url(), "svc-1").await;
    eventually(
        "flow-proxy tried to apply the stored change and failed",
        Duration::from_secs(20),
        || async { proxy.log().contains("haproxy.cfg.candidate") },
    )
    .await;
    let (status, _) = proxy.get_through_proxy("/svc-1/x", None).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "not routed yet");

    std::fs::remove_dir(&candidate).expect("unblock the candidate path");
    eventually(
        "the stored change applies once the file can be written",
        Duration::from_secs(30),
        || async {
            proxy.get_through_proxy("/svc-1/x", None).await
                == (StatusCode::OK, "svc-1 /svc-1/x".to_string())
        },
    )
    .await;
    assert!(
        !proxy.log().contains("skipping a stored change"),
        "the change was retried, not skipped: {}",
        proxy.log()
    );
}
