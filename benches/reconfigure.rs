//! Measures what a user waits for: rendering a full configuration, a whole reconfigure
//! (registry read, render, `haproxy -c`, KV write, seamless reload) against a real HAProxy, and
//! a burst of concurrent reconfigures (which the core applies in batches).
//!
//! Run with `cargo bench --bench reconfigure`; figures go to BENCHMARKS.md.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use flow_proxy::render::{RenderSettings, Renderer, ServiceRoute};
use flow_proxy::settings::Settings;
use flow_proxy::spec::{Instance, ServiceSpec};
use flow_proxy::FlowProxy;

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
    let data_dir = tempfile::tempdir().expect("temporary directory");
    let http_port = std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .and_then(|listener| listener.local_addr())
        .expect("free port")
        .port();
    let settings = Settings {
        api_address: SocketAddr::from((Ipv4Addr::LOCALHOST, 0)),
        consul_address: Vec::new(),
        embedded_registry_address: SocketAddr::from((Ipv4Addr::LOCALHOST, 0)),
        data_dir: data_dir.path().to_path_buf(),
        haproxy_binary: PathBuf::from("haproxy"),
        bind_host: Some(Ipv4Addr::LOCALHOST.into()),
        http_port,
        templates_dir: None,
        kv_prefix: "flow-proxy".into(),
    };
    let app = FlowProxy::start(settings)
        .await
        .expect("flow-proxy starts (is haproxy installed?)");
    let client = reqwest::Client::new();
    let api = format!("http://{}", app.api_address());
    let mut routed = 0;
    for target in [1, 100, 500] {
        while routed < target {
            reconfigure(&client, &api, routed).await;
            routed += 1;
        }
        let mut samples = Vec::new();
        for run in 0..20 {
            let started = Instant::now();
            // Re-route one existing service: the configuration keeps `target` services.
            reconfigure(&client, &api, run % target).await;
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
        futures::future::join_all((0..50).map(|index| reconfigure(&client, &api, index))).await;
        samples.push(started.elapsed());
    }
    println!(
        "burst of 50 concurrent reconfigures, {routed} services routed: {}",
        summary(samples)
    );
    app.stop().await;
}

async fn reconfigure(client: &reqwest::Client, api: &str, index: usize) {
    let response = client
        .get(format!(
            "{api}/v1/docker-flow-proxy/reconfigure?serviceName=service-{index}&servicePath=/service-{index}"
        ))
        .send()
        .await
        .expect("API answers");
    assert!(
        response.status().is_success(),
        "reconfigure service-{index}"
    );
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
