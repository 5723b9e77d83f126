//! Measures what a user waits for: rendering a full configuration, a whole reconfigure
//! (registry read, render, `haproxy -c`, KV write, seamless reload) against a real HAProxy, and
//! a burst of concurrent reconfigures (which the core applies in batches).
//!
//! Run with `cargo bench --bench reconfigure`; figures go to BENCHMARKS.md.

use std::path::PathBuf;
use std::time::{Duration, Instant};

// The integration tests' TestProxy: flow-proxy, its embedded registry and a real HAProxy on
// loopback ports; the bench uses only part of it.
#[allow(dead_code)]
#[path = "../tests/api/helpers.rs"]
mod helpers;

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
    let proxy = TestProxy::spawn().await;
    let mut routed = 0;
    for target in [1, 100, 500] {
        while routed < target {
            reconfigure(&proxy, routed).await;
            routed += 1;
        }
        let mut samples = Vec::new();
        for run in 0..20 {
            let started = Instant::now();
            // Re-route one existing service: the configuration keeps `target` services.
            reconfigure(&proxy, run % target).await;
            samples.push(started.elapsed());
        }
        println!(
            "reconfigure, {target:>4} services routed: {}",
            summary(samples)
        );
    }
    let mut samples = Vec::new();
    for _ in 0..5 {
        let started = Instant::now();
        futures::future::join_all((0..50).map(|index| reconfigure(&proxy, index))).await;
        samples.push(started.elapsed());
    }
    println!(
        "burst of 50 concurrent reconfigures, {routed} services routed: {}",
        summary(samples)
    );
}

async fn reconfigure(proxy: &TestProxy, index: usize) {
    let (status, answer) = proxy
        .reconfigure(&format!(
            "serviceName=service-{index}&servicePath=/service-{index}"
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
        .block_on(bench_reconfigure());
}
