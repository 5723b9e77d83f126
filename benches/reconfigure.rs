//! Measures what a user waits for: rendering a full configuration, a whole reconfigure
//! (registry read, render, `haproxy -c`, KV write, seamless reload) against a real HAProxy, a
//! burst of concurrent reconfigures (which the core applies in batches), and how long a change
//! takes to reach HAProxy without any call: a route set on another proxy, a new instance.
//!
//! Run with `cargo bench --bench reconfigure`; figures go to BENCHMARKS.md.

use std::path::PathBuf;
use std::time::{Duration, Instant};

// The integration tests' TestProxy: flow-proxy, its embedded registry and a real HAProxy on
// loopback ports; the bench uses only part of it.
#[allow(dead_code)]
#[path = "../tests/api/helpers.rs"]
mod helpers;
// The client TestProxy derefs to (`reconfigure`, `get_through_proxy`, ...); helpers.rs names it
// `crate::proxy_client`.
#[allow(dead_code)]
#[path = "../tests/api/proxy_client.rs"]
mod proxy_client;

use helpers::TestProxy;

use flow_proxy::render::{RenderSettings, Renderer, ServiceRoute};
use flow_proxy::spec::{Instance, ServiceSpec};

fn spec(index: usize) -> ServiceSpec {
    let pairs = vec![
        ("serviceName".to_string(), format!("service-{index}")),
        ("servicePath".to_string(), format!("/service-{index}")),
    ];
    ServiceSpec::from_query(&pairs).expect("a valid spec")
}

/// Median and 90th percentile of the samples.
fn summary(mut samples: Vec<Duration>) -> String {
    samples.sort();
    let at = |fraction: f64| samples[((samples.len() - 1) as f64 * fraction).round() as usize];
    format!(
        "median {:>9.3} ms, p90 {:>9.3} ms ({} runs)",
        at(0.5).as_secs_f64() * 1e3,
        at(0.9).as_secs_f64() * 1e3,
        samples.len()
    )
}

fn bench_render() {
    let renderer = Renderer::new(None).expect("built-in templates");
    let settings = RenderSettings {
        bind_host: None,
        http_port: 80,
        stats_socket: PathBuf::from("/run/flow-proxy/haproxy.sock"),
        errors_dir: PathBuf::from("/run/flow-proxy/errors"),
        https_only: false,
        users: Vec::new(),
        stats: None,
        service_domain_algo: Default::default(),
        proxy_wide: Default::default(),
        acme_challenge: None,
    };
    for count in [10, 100, 1_000, 10_000] {
        let specs: Vec<ServiceSpec> = (0..count).map(spec).collect();
        let instances: Vec<Vec<Instance>> = (0..count)
            .map(|index| {
                (0..3)
                    .map(|n| {
                        Instance::new(&format!("10.0.{}.{n}", index % 250), 8080).expect("instance")
                    })
                    .collect()
            })
            .collect();
        let routes: Vec<ServiceRoute<'_>> = specs
            .iter()
            .zip(&instances)
            .map(|(spec, instances)| ServiceRoute { spec, instances })
            .collect();
        let runs = if count >= 10_000 { 5 } else { 20 };
        let samples = (0..runs)
            .map(|_| {
                let started = Instant::now();
                let text = renderer.render(&settings, &routes).expect("renders");
                std::hint::black_box(text);
                started.elapsed()
            })
            .collect();
        println!(
            "render, {count:>6} services x 3 instances: {}",
            summary(samples)
        );
    }
}

async fn bench_reconfigure() {
    let mut proxy = TestProxy::spawn().await;
    // The path variant each routed service is on; a new variant changes the configuration.
    let mut variants: Vec<usize> = Vec::new();
    let mut next_variant = 1;
    for target in [1, 100, 500] {
        while variants.len() < target {
            reconfigure(&proxy, variants.len(), 0).await;
            variants.push(0);
        }
        let mut samples = Vec::new();
        for run in 0..20 {
            let index = run % target;
            let started = Instant::now();
            // Re-route one existing service on a new path: the configuration keeps `target`
            // services and changes, so HAProxy reloads.
            reconfigure(&proxy, index, next_variant).await;
            samples.push(started.elapsed());
            variants[index] = next_variant;
            next_variant += 1;
        }
        println!(
            "reconfigure, {target:>4} services routed: {}",
            summary(samples)
        );
    }
    let routed = variants.len();
    let mut samples = Vec::new();
    for run in 0..20 {
        let index = run % routed;
        let started = Instant::now();
        // The spec it already has: stored again, no reload.
        reconfigure(&proxy, index, variants[index]).await;
        samples.push(started.elapsed());
    }
    println!(
        "reconfigure with an unchanged spec, {routed} services routed: {}",
        summary(samples)
    );
    let mut samples = Vec::new();
    for _ in 0..5 {
        let variant = next_variant;
        next_variant += 1;
        let started = Instant::now();
        futures::future::join_all((0..50).map(|index| reconfigure(&proxy, index, variant))).await;
        samples.push(started.elapsed());
    }
    println!(
        "burst of 50 concurrent reconfigures, {routed} services routed: {}",
        summary(samples)
    );
    // Its watches would otherwise keep running beside the next measurements.
    proxy.stop().await;
}

/// A change made on proxy A, until proxy B (same registry) serves it through its HAProxy; and a
/// new instance registered in the registry, until HAProxy serves it. No API call on B either way.
async fn bench_propagation() {
    let mut a = TestProxy::spawn().await;
    let registry = a.registry_address();
    let mut b = TestProxy::spawn_with(|settings| settings.consul_address = vec![registry]).await;
    let backend = helpers::spawn_backend("web").await;
    a.register_instance("web", "web.1", backend.port).await;

    let mut samples = Vec::new();
    for run in 0..20 {
        let path = format!("/web-{run}");
        let (status, answer) = a
            .reconfigure(&format!("serviceName=web&servicePath={path}"))
            .await;
        assert!(status.is_success(), "{answer}");
        let answered = Instant::now();
        wait_until_served(&b, &path).await;
        samples.push(answered.elapsed());
    }
    println!(
        "a reconfigure on A served by B, after A answered: {}",
        summary(samples)
    );

    let mut samples = Vec::new();
    for run in 0..20 {
        let service = format!("late-{run}");
        let path = format!("/{service}");
        let (status, answer) = b
            .reconfigure(&format!("serviceName={service}&servicePath={path}"))
            .await;
        assert!(status.is_success(), "{answer}");
        let registered = Instant::now();
        a.register_instance(&service, &format!("{service}.1"), backend.port)
            .await;
        wait_until_served(&b, &path).await;
        samples.push(registered.elapsed());
    }
    println!(
        "an instance registered, served by HAProxy: {}",
        summary(samples)
    );
    b.stop().await;
    a.stop().await;
}

/// Polls `path` through the proxy's HAProxy until it answers 200 (at most 10 s).
async fn wait_until_served(proxy: &TestProxy, path: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while proxy.get_through_proxy(path, None).await.0 != reqwest::StatusCode::OK {
        assert!(Instant::now() < deadline, "{path} never served");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

async fn reconfigure(proxy: &TestProxy, index: usize, variant: usize) {
    let (status, answer) = proxy
        .reconfigure(&format!(
            "serviceName=service-{index}&servicePath=/service-{index}/v{variant}"
        ))
        .await;
    assert!(status.is_success(), "reconfigure service-{index}: {answer}");
}

fn main() {
    // `cargo test --benches` runs this binary with `--bench` absent; measure only under `cargo bench`.
    if !std::env::args().any(|arg| arg == "--bench") {
        return;
    }
    bench_render();
    tokio::runtime::Runtime::new()
        .expect("runtime")
        .block_on(async {
            bench_reconfigure().await;
            bench_propagation().await;
        });
}
