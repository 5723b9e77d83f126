//! A proxy that starts with thousands of stored specs routes every one of them, and what that
//! costs: the time from start to every route served and the memory it then holds (printed
//! with `--nocapture`; `FLOW_PROXY_SCALE_SERVICES` sets how many, 1,000 unless given, and
//! `FLOW_PROXY_SCALE_WATCH=1` watches their instances).

use std::net::{Ipv4Addr, SocketAddr};
use std::time::Instant;

use flow_proxy::registry::embedded::EmbeddedRegistry;

use futures::stream::{self, StreamExt};
use reqwest::StatusCode;

use crate::helpers::{spawn_backend, TestProxy};

/// How many services the test stores.
fn service_count() -> usize {
    std::env::var("FLOW_PROXY_SCALE_SERVICES")
        .ok()
        .and_then(|count| count.parse().ok())
        .unwrap_or(1_000)
}

/// Whether the restored services' instances are watched (`FLOW_PROXY_SCALE_WATCH=1`; off unless
/// given).
fn watch_instances() -> bool {
    std::env::var("FLOW_PROXY_SCALE_WATCH").is_ok_and(|value| value == "1")
}

/// This process's resident memory in MiB (`VmRSS` of `/proc/self/status`).
fn resident_mib() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status");
    let kib: f64 = status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("a VmRSS line");
    kib / 1024.0
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_start_with_thousands_of_stored_specs_serves_every_route() {
    let count = service_count();
    let backend = spawn_backend("scaled").await;
    // The specs (as the API stores them) and one instance each, written into the registry of a
    // data directory before any proxy runs there: the start finds them all at once.
    let data_dir = tempfile::tempdir().expect("a data directory");
    let registry =
        EmbeddedRegistry::start(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)), data_dir.path())
            .await
            .expect("the registry starts");
    let registry_url = format!("http://{}", registry.address());
    let http = reqwest::Client::new();
    stream::iter(0..count)
        .for_each_concurrent(16, |index| {
            let (http, registry_url) = (&http, &registry_url);
            async move {
                let name = format!("service-{index}");
                let spec = format!(
                    r#"{{"ServiceName":"{name}","ServiceDest":[{{"Index":0,"ServicePath":["/{name}"]}}]}}"#
                );
                let stored = http
                    .put(format!("{registry_url}/v1/kv/flow-proxy/services/{name}"))
                    .body(spec)
                    .send()
                    .await
                    .expect("registry answers");
                assert_eq!(stored.status(), StatusCode::OK);
                let instance = serde_json::json!({
                    "ID": format!("{name}.1"), "Name": name, "Port": backend.port,
                    "Address": "127.0.0.1"
                });
                let registered = http
                    .put(format!("{registry_url}/v1/agent/service/register"))
                    .json(&instance)
                    .send()
                    .await
                    .expect("registry answers");
                assert_eq!(registered.status(), StatusCode::OK);
            }
        })
        .await;
    registry.shutdown().await;
    let rss_before = resident_mib();

    let started = Instant::now();
    let proxy = TestProxy::spawn_with(|settings| {
        settings.data_dir = data_dir.path().to_path_buf();
        // One blocking-query watch per service is what the watch redesign removes; thousands of
        // them at once flood the registry this test process also serves.
        settings.watch_instances = watch_instances();
    })
    .await;
    let restored_in = started.elapsed();
    let rss_restored = resident_mib();
    println!(
        "start with {count} stored specs (debug build, instance watches {}): {:.2} s until \
         HAProxy serves them; resident memory of the test process: {rss_before:.1} MiB before \
         the start, {rss_restored:.1} MiB once restored",
        if watch_instances() { "on" } else { "off" },
        restored_in.as_secs_f64(),
    );
    let config = proxy.config().await;
    assert_eq!(
        config.matches("\nbackend service-").count(),
        count,
        "a backend per stored service"
    );
    assert_eq!(
        config
            .matches(&format!(" 127.0.0.1:{} check\n", backend.port))
            .count(),
        count,
        "each backend has its instance"
    );
    // The pool of empty backends grows with the routed services, as the README says: 8, and one
    // per 64 routed services from 512 on (15 with a thousand).
    let pool = (count / 64).clamp(8, 256);
    assert!(
        config.contains(&format!("\nbackend pool-{pool}\n"))
            && !config.contains(&format!("\nbackend pool-{}\n", pool + 1)),
        "{pool} pool backends with {count} services routed"
    );
    for index in [0, 1, count / 3, count / 2, count - 1] {
        let (status, body) = proxy
            .get_through_proxy(&format!("/service-{index}"), None)
            .await;
        assert_eq!(status, StatusCode::OK, "/service-{index}: {body}");
        assert_eq!(body, format!("scaled /service-{index}"));
    }
    println!(
        "resident memory after the checks: {:.1} MiB",
        resident_mib()
    );
}
