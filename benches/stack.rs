//! The stack benchmark of issue 10 (scenarios A–H): each scenario starts the real stack on
//! loopback (the embedded Consul-compatible registry, the `flow-proxy` binary as a child process
//! pointed at it with `--consul-address`, its HAProxy, backends that answer `<name> <path>`) and
//! measures what a user or an operator sees from outside: API answers, requests through
//! HAProxy, `/metrics` (reloads), the registry's side of the connection, /proc (memory, CPU,
//! sockets, HAProxy processes). Nothing inside flow-proxy is read, so the figures measure
//! whatever the product does today.
//!
//! - A. `/reconfigure` latency with 1, 1,000 and 10,000 services routed: a new plain service, a
//!   changed service (a new path) and a change that needs a reload (`timeoutServer`).
//! - B. An instance registered → the first request it serves through HAProxy; reloads.
//! - C. A blue-green switch → all traffic on the new color; reloads.
//! - D. Failed requests while 100 changes are applied, with a `Connection: close` client and with
//!   a keep-alive client.
//! - E. 1,000 concurrent reconfigures of distinct services; reloads; HAProxy processes left.
//! - F. Restore: 1,000 and 10,000 stored specs → every route served (measured while setting A up).
//! - G. flow-proxy's resident memory and CPU at 10,000 services idle and during E.
//! - H. Connections and requests flow-proxy makes to the registry, idle and per instance change
//!   (through a counting relay in front of the registry).
//!
//! Layout: this file holds the scenarios and the run; `stack/fixture.rs` the stack they start
//! and the polls and timings they share; `stack/load.rs` the hyper load generator;
//! `stack/relay.rs` the counting relay; `stack/report.rs` the table, percentiles and /proc.
//!
//! Run: `cargo bench --bench stack` (the sizes, release). `STACK_SCALE=small` runs a
//! tenth of the sizes; `STACK_ONLY=BC` runs some scenarios only; `STACK_A_SIZES=10000` runs A
//! (with F and G's idle figures) at the sizes given. In debug, for a quick check:
//! `STACK_SCALE=small cargo test --bench stack`. Without `--bench` or `STACK_SCALE` (as in
//! `cargo test --benches`) it measures nothing.

use std::future::Future;
use std::net::Ipv4Addr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use reqwest::StatusCode;
use tokio::time::Instant;

// The integration tests' harness: ProxyProcess (the flow-proxy binary as a child process),
// SharedRegistry (the embedded registry in this process), backends, the API client.
#[allow(dead_code)]
#[path = "../tests/api/fleet.rs"]
mod fleet;
#[allow(dead_code)]
#[path = "../tests/api/helpers.rs"]
mod helpers;
#[allow(dead_code)]
#[path = "../tests/api/proxy_client.rs"]
mod proxy_client;

#[path = "stack/fixture.rs"]
mod fixture;
#[path = "stack/load.rs"]
mod load;
#[path = "stack/relay.rs"]
mod relay;
#[path = "stack/report.rs"]
mod report;

use fixture::{
    idle_cpu, reconfigure_ok, reload_figure, sampled, scale_up_and_down, service_name, services,
    timed_reconfigure, wait_all_from, wait_served, ReloadCounter, Stack, StackOptions,
    CHANGE_DEADLINE, MIN_SAMPLES, POLL_PAUSE, RESTORE_DEADLINE,
};
use helpers::spawn_backend;
use load::{get_once, served, ClientKind, Load};
use proxy_client::ProxyClient;
use report::{cpu_time, megabytes, resident_bytes, seconds, Latencies, Met, Table};

/// The sizes and counts of one run.
struct Scale {
    name: &'static str,
    /// A: services routed before the measurements (F is measured for all but the first).
    a_sizes: &'static [usize],
    /// A: at most this many samples per kind of change and size…
    a_samples: usize,
    /// …and no new sample once this has passed (after at least [`MIN_SAMPLES`]).
    a_budget: Duration,
    b_samples: usize,
    c_samples: usize,
    d_changes: usize,
    e_burst: usize,
    h_services: usize,
    h_changes: usize,
    /// G: how long "idle" is watched.
    idle_window: Duration,
}

const FULL: Scale = Scale {
    name: "full",
    a_sizes: &[1, 1_000, 10_000],
    a_samples: 50,
    a_budget: Duration::from_secs(20),
    b_samples: 50,
    c_samples: 20,
    d_changes: 100,
    e_burst: 1_000,
    h_services: 1_000,
    h_changes: 20,
    idle_window: Duration::from_secs(10),
};

const SMALL: Scale = Scale {
    name: "small",
    a_sizes: &[1, 100, 1_000],
    a_samples: 10,
    a_budget: Duration::from_secs(8),
    b_samples: 10,
    c_samples: 6,
    d_changes: 20,
    e_burst: 100,
    h_services: 100,
    h_changes: 5,
    idle_window: Duration::from_secs(5),
};

/// D: concurrent keep-alive clients.
const KEEP_ALIVE_CLIENTS: usize = 4;

/// H: how long "idle" is watched: longer than a blocking query's wait (flow-proxy asks for
/// 60 s; Consul adds up to 1/16 of it as jitter), so every watch shows up in the count.
const H_IDLE_WINDOW: Duration = Duration::from_secs(75);

/// E: how long one reconfigure of the burst may keep being refused as busy.
const BURST_DEADLINE: Duration = Duration::from_secs(120);

/// E: HAProxy's `hard-stop-after`, short so that the run sees the old processes go.
const HARD_STOP_AFTER: Duration = Duration::from_secs(2);

// ---- the scenarios -----------------------------------------------------------------------------

/// A (with F and G's idle figures on the way): for each size, a stack restored from that many
/// stored specs, then three kinds of reconfigure timed from call to answer.
async fn scenario_a(scale: &'static Scale, table: Table) {
    let largest = scale.a_sizes.iter().copied().max().unwrap_or(0);
    for &size in scale.a_sizes {
        let mut stack = Stack::start(StackOptions {
            services: size,
            ..StackOptions::default()
        })
        .await;
        let restored = stack.wait_restored().await;
        if size > 1 {
            table.info(
                "F",
                format!("setup: {size} specs stored in KV and {size} instances registered"),
                seconds(stack.seeding),
            );
            let (target, met) = if size == 10_000 {
                (
                    "≤ 3 s",
                    restored.map_or(Met::No, |t| Met::from(t.as_secs_f64() <= 3.0)),
                )
            } else {
                ("", Met::NoTarget)
            };
            table.push(
                "F",
                format!("restore {size} stored specs: process start → sampled routes served"),
                restored.map_or_else(|| "not within 300 s".to_string(), seconds),
                target,
                met,
            );
            let routes = stack.routes_served().await;
            table.push(
                "F",
                format!("routes served after the restore, {size} services"),
                format!("{routes}/{size}"),
                "all",
                Met::from(routes == size),
            );
        }
        let Some(_) = restored else {
            panic!("{size} stored specs were not restored within {RESTORE_DEADLINE:?}");
        };
        if size == largest {
            // Let the restore's aftermath (watches starting, an old HAProxy leaving) pass.
            tokio::time::sleep(Duration::from_secs(2)).await;
            let pid = stack.proxy.pid();
            let rss = resident_bytes(pid);
            let cpu = idle_cpu(pid, scale.idle_window).await;
            let (target, met) = if size == 10_000 {
                (
                    "≤ 50 MB",
                    rss.map_or(Met::No, |rss| Met::from(rss <= 50_000_000)),
                )
            } else {
                ("", Met::NoTarget)
            };
            table.push(
                "G",
                format!("flow-proxy RSS, {size} services, idle"),
                rss.map_or_else(|| "n/a".into(), megabytes),
                target,
                met,
            );
            table.info(
                "G",
                format!(
                    "flow-proxy CPU, {size} services, idle over {} s",
                    scale.idle_window.as_secs()
                ),
                cpu.map_or_else(
                    || "n/a".into(),
                    |share| format!("{:.1}% of a core", share * 100.0),
                ),
            );
        }
        measure_reconfigures(scale, &table, &mut stack, size).await;
        stack.stop().await;
    }
}

/// A at one size: a new plain service, a changed service, a change that needs a reload.
async fn measure_reconfigures(scale: &Scale, table: &Table, stack: &mut Stack, size: usize) {
    let paths = std::sync::Mutex::new(std::mem::take(&mut stack.paths));
    let proxy: &ProxyClient = &stack.proxy;
    let port = stack.port();
    let not_live = AtomicUsize::new(0);
    let failed = AtomicUsize::new(0);
    let check = |outcome: Result<(), String>, query: &str| {
        if let Err(why) = outcome {
            eprintln!("reconfigure?{query} failed: {why}");
            failed.fetch_add(1, Ordering::Relaxed);
        }
    };

    // A new plain service (its instance registered first, as a deployment does).
    let reloads = ReloadCounter::start(proxy).await;
    let samples = sampled(scale.a_samples, scale.a_budget, |k| {
        let name = format!("a{k:05}");
        let (registry, backend_port) = (&stack.registry, stack.backend.port);
        let (not_live, check) = (&not_live, &check);
        async move {
            registry
                .register_instance(&name, &format!("{name}-1"), backend_port)
                .await;
            let query = format!("serviceName={name}&servicePath=/{name}");
            let (took, outcome) = timed_reconfigure(proxy, &query).await;
            check(outcome, &query);
            if !served(port, &format!("/{name}")).await {
                not_live.fetch_add(1, Ordering::Relaxed);
            }
            took
        }
    })
    .await;
    push_a(
        table,
        size,
        "new plain service",
        Latencies::new(samples),
        Some((Duration::from_millis(5), "5 ms")),
        reloads.since(proxy).await,
        not_live.swap(0, Ordering::Relaxed),
    );

    // A changed service: an existing one moves to a new path.
    let reloads = ReloadCounter::start(proxy).await;
    let samples = sampled(scale.a_samples, scale.a_budget, |k| {
        let index = k % size;
        let path = format!("/c{k:05}");
        let (not_live, check, paths) = (&not_live, &check, &paths);
        async move {
            let query = format!("serviceName={}&servicePath={path}", service_name(index));
            let (took, outcome) = timed_reconfigure(proxy, &query).await;
            check(outcome, &query);
            if !served(port, &path).await {
                not_live.fetch_add(1, Ordering::Relaxed);
            }
            paths.lock().expect("not poisoned")[index] = path;
            took
        }
    })
    .await;
    push_a(
        table,
        size,
        "changed service (new path)",
        Latencies::new(samples),
        None,
        reloads.since(proxy).await,
        not_live.swap(0, Ordering::Relaxed),
    );

    // A change that needs new config text: the service's `timeout server`.
    let reloads = ReloadCounter::start(proxy).await;
    let samples = sampled(scale.a_samples, scale.a_budget, |k| {
        let index = (size - 1) - k % size;
        let path = paths.lock().expect("not poisoned")[index].clone();
        let (not_live, check) = (&not_live, &check);
        async move {
            let query = format!(
                "serviceName={}&servicePath={path}&timeoutServer={}",
                service_name(index),
                31 + k
            );
            let (took, outcome) = timed_reconfigure(proxy, &query).await;
            check(outcome, &query);
            if !served(port, &path).await {
                not_live.fetch_add(1, Ordering::Relaxed);
            }
            took
        }
    })
    .await;
    let limit = match size {
        1 => Some((Duration::from_millis(50), "50 ms")),
        10_000 => Some((Duration::from_secs(1), "1 s")),
        _ => None,
    };
    push_a(
        table,
        size,
        "change that needs a reload (timeoutServer)",
        Latencies::new(samples),
        limit,
        reloads.since(proxy).await,
        not_live.swap(0, Ordering::Relaxed),
    );

    // An instance-only change: a service gets a new instance, and the deployment calls
    // reconfigure with the spec the service already has (the instance watch may have applied
    // the instance first, as it would in production).
    let reloads = ReloadCounter::start(proxy).await;
    let mut extra_backends = Vec::new();
    let mut instances_of: std::collections::HashMap<usize, usize> = Default::default();
    let mut samples = Vec::new();
    let started = Instant::now();
    while samples.len() < scale.a_samples
        && (samples.len() < MIN_SAMPLES || started.elapsed() < scale.a_budget)
    {
        let k = samples.len();
        let index = (k * 7) % size;
        let path = paths.lock().expect("not poisoned")[index].clone();
        let label = format!("i{k}");
        let backend = spawn_backend(&label).await;
        let name = service_name(index);
        stack
            .registry
            .register_instance(&name, &format!("{name}-{label}"), backend.port)
            .await;
        extra_backends.push(backend);
        let query = format!("serviceName={name}&servicePath={path}");
        let (took, outcome) = timed_reconfigure(proxy, &query).await;
        check(outcome, &query);
        // Round robin: within one request per instance (and one more), the new one answers.
        let instances = {
            let count = instances_of.entry(index).or_insert(1);
            *count += 1;
            *count
        };
        let mut answered = false;
        for _ in 0..=instances {
            if get_once(port, &path)
                .await
                .is_ok_and(|answer| answer.backend() == label)
            {
                answered = true;
                break;
            }
        }
        if !answered {
            not_live.fetch_add(1, Ordering::Relaxed);
        }
        samples.push(took);
    }
    push_a(
        table,
        size,
        "instance-only change (same spec, a new instance registered just before)",
        Latencies::new(samples),
        Some((Duration::from_millis(5), "5 ms")),
        reloads.since(proxy).await,
        not_live.swap(0, Ordering::Relaxed),
    );
    stack.paths = paths.into_inner().expect("not poisoned");
    let failed = failed.load(Ordering::Relaxed);
    if failed > 0 {
        table.push(
            "A",
            format!("reconfigures not answered 200, {size} services"),
            failed.to_string(),
            "0",
            Met::No,
        );
    }
}

fn push_a(
    table: &Table,
    size: usize,
    kind: &str,
    latencies: Latencies,
    p50_limit: Option<(Duration, &str)>,
    reloads: Option<u64>,
    not_live: usize,
) {
    let (target, met) = match p50_limit {
        Some((limit, text)) => (format!("p50 ≤ {text}"), latencies.p50_within(limit)),
        None => (String::new(), Met::NoTarget),
    };
    let mut figure = format!(
        "{}; reloads {}",
        latencies.describe(),
        reload_figure(reloads)
    );
    if not_live > 0 {
        figure.push_str(&format!("; {not_live} answered before the route served"));
    }
    table.push(
        "A",
        format!("reconfigure, {kind}, {} routed", services(size)),
        figure,
        target,
        met,
    );
}

/// B: instances registered in the registry → served through HAProxy.
async fn scenario_b(scale: &'static Scale, table: Table) {
    let stack = Stack::start(StackOptions::default()).await;
    stack
        .registry
        .register_instance("scale", "scale-base", stack.backend.port)
        .await;
    reconfigure_ok(&stack.proxy, "serviceName=scale&servicePath=/scale").await;
    wait_served(stack.port(), "/scale").await;
    let reloads = ReloadCounter::start(&stack.proxy).await;
    let mut samples = Vec::new();
    let mut missed = 0;
    for k in 0..scale.b_samples {
        match scale_up_and_down(&stack, "scale", "/scale", "bench", &format!("new{k}")).await {
            Some(took) => samples.push(took),
            None => missed += 1,
        }
    }
    let reloads = reloads.since(&stack.proxy).await;
    let latencies = Latencies::new(samples);
    let mut figure = latencies.describe();
    if missed > 0 {
        figure.push_str(&format!("; {missed} never served within 15 s"));
    }
    table.push(
        "B",
        "instance registered → first request served by it",
        figure,
        "p50 ≤ 10 ms",
        latencies.p50_within(Duration::from_millis(10)),
    );
    table.push(
        "B",
        format!(
            "reloads during {n} instances registered and {n} deregistered",
            n = scale.b_samples
        ),
        reload_figure(reloads),
        "0",
        Met::from(reloads == Some(0)),
    );
    stack.stop().await;
}

/// C: blue-green switches → all traffic on the new color.
async fn scenario_c(scale: &'static Scale, table: Table) {
    let stack = Stack::start(StackOptions::default()).await;
    let blue = spawn_backend("blue").await;
    let green = spawn_backend("green").await;
    stack
        .registry
        .register_instance("bg-blue", "bg-blue-1", blue.port)
        .await;
    stack
        .registry
        .register_instance("bg-green", "bg-green-1", green.port)
        .await;
    reconfigure_ok(
        &stack.proxy,
        "serviceName=bg&servicePath=/bg&serviceColor=blue",
    )
    .await;
    let on_blue = wait_all_from(stack.port(), "/bg", "blue", 5, Instant::now()).await;
    assert!(on_blue.is_some(), "bg is never served by blue");
    let reloads = ReloadCounter::start(&stack.proxy).await;
    let mut switched = Vec::new();
    let mut answered = Vec::new();
    let mut missed = 0;
    for k in 0..scale.c_samples {
        let color = if k % 2 == 0 { "green" } else { "blue" };
        let called = Instant::now();
        reconfigure_ok(
            &stack.proxy,
            &format!("serviceName=bg&servicePath=/bg&serviceColor={color}"),
        )
        .await;
        answered.push(called.elapsed());
        match wait_all_from(stack.port(), "/bg", color, 10, called).await {
            Some(took) => switched.push(took),
            None => missed += 1,
        }
    }
    let reloads = reloads.since(&stack.proxy).await;
    let latencies = Latencies::new(switched);
    let mut figure = latencies.describe();
    if missed > 0 {
        figure.push_str(&format!("; {missed} never switched within 15 s"));
    }
    table.push(
        "C",
        "serviceColor switch: call → every request on the new color (10 in a row)",
        figure,
        "p50 ≤ 10 ms",
        latencies.p50_within(Duration::from_millis(10)),
    );
    table.info(
        "C",
        "serviceColor switch: call → answer",
        Latencies::new(answered).describe(),
    );
    table.push(
        "C",
        format!("reloads during {} switches", scale.c_samples),
        reload_figure(reloads),
        "0",
        Met::from(reloads == Some(0)),
    );
    stack.stop().await;
}

/// D: requests failed while changes are applied, one client kind at a time.
async fn scenario_d(scale: &'static Scale, table: Table) {
    let stack = Stack::start(StackOptions::default()).await;
    stack
        .registry
        .register_instance("load", "load-1", stack.backend.port)
        .await;
    reconfigure_ok(&stack.proxy, "serviceName=load&servicePath=/load").await;
    wait_served(stack.port(), "/load").await;
    // The `Connection: close` client runs at the highest rate this machine sustains: as many
    // concurrent clients as gave the most answers per second in a short probe.
    let mut close_clients = 1;
    let mut best_rate = 0.0;
    for clients in [1, 2, 4, 8, 16] {
        let probe = Load::start(ClientKind::Close, stack.port(), "/load", clients);
        tokio::time::sleep(Duration::from_secs(1)).await;
        let rate = probe.finish().await.rate();
        if rate > best_rate {
            (close_clients, best_rate) = (clients, rate);
        }
    }
    for (phase, kind, clients, label) in [
        (
            0,
            ClientKind::Close,
            close_clients,
            "`Connection: close` client",
        ),
        (
            1,
            ClientKind::KeepAlive,
            KEEP_ALIVE_CLIENTS,
            "keep-alive client",
        ),
    ] {
        let load = Load::start(kind, stack.port(), "/load", clients);
        // Let the clients reach their pace before the first change.
        tokio::time::sleep(Duration::from_millis(500)).await;
        let reloads = ReloadCounter::start(&stack.proxy).await;
        let mut change_failures = 0;
        for k in 0..scale.d_changes {
            // Half new plain services, half a change of the loaded service's own backend.
            let query = if k % 2 == 0 {
                format!("serviceName=d{phase}{k:04}&servicePath=/d{phase}{k:04}")
            } else {
                format!(
                    "serviceName=load&servicePath=/load&timeoutServer={}",
                    30 + k
                )
            };
            if let (_, Err(why)) = timed_reconfigure(&stack.proxy, &query).await {
                eprintln!("reconfigure?{query} failed: {why}");
                change_failures += 1;
            }
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        let report = load.finish().await;
        let reloads = reloads.since(&stack.proxy).await;
        let mut figure = format!(
            "{} socket errors + {} non-2xx of {} requests ({:.0}/s, {} at once, {} \
             reconnects); reloads {}",
            report.socket_errors,
            report.non_2xx,
            report.requests,
            report.rate(),
            clients,
            report.reconnects,
            reload_figure(reloads)
        );
        if change_failures > 0 {
            figure.push_str(&format!("; {change_failures} changes not answered 200"));
        }
        if !report.examples.is_empty() {
            figure.push_str(&format!("; e.g. {}", report.examples.join(" / ")));
        }
        table.push(
            "D",
            format!(
                "{label}: failed requests during {} changes",
                scale.d_changes
            ),
            figure,
            "0 and 0",
            Met::from(report.socket_errors == 0 && report.non_2xx == 0),
        );
    }
    stack.stop().await;
}

/// The backend of [`spawn_slow_backend`]; it stops when dropped.
struct SlowBackend {
    port: u16,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for SlowBackend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A backend whose `/hold/slow` answers only after two minutes (so a request to it keeps an
/// HAProxy process busy) and whose other paths answer at once; counts the slow requests that
/// arrived.
async fn spawn_slow_backend() -> (SlowBackend, Arc<AtomicUsize>) {
    let listener = tokio::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .await
        .expect("bind the slow backend");
    let port = listener.local_addr().expect("backend address").port();
    let arrived = Arc::new(AtomicUsize::new(0));
    let counter = arrived.clone();
    let app = axum::Router::new().fallback(move |uri: axum::http::Uri| {
        let counter = counter.clone();
        async move {
            if uri.path().ends_with("/slow") {
                counter.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_secs(120)).await;
            }
            format!("hold {}", uri.path())
        }
    });
    let task = tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    (SlowBackend { port, task }, arrived)
}

/// A request through HAProxy that waits for its answer as long as the task runs.
async fn held_request(port: u16, path: String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let Ok(mut stream) = tokio::net::TcpStream::connect(("127.0.0.1", port)).await else {
        return;
    };
    let head = format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n");
    if stream.write_all(head.as_bytes()).await.is_err() {
        return;
    }
    let mut sink = Vec::new();
    let _ = stream.read_to_end(&mut sink).await;
}

/// A reconfigure as a well-behaved client sends it: a `503` (flow-proxy's queue of changes is
/// full) is sent again after its `Retry-After` (at most 1 s), until [`BURST_DEADLINE`]; each
/// such answer is counted in `busy`.
async fn reconfigure_retrying_when_busy(
    proxy: &ProxyClient,
    query: &str,
    busy: &AtomicUsize,
) -> Result<(), String> {
    let deadline = Instant::now() + BURST_DEADLINE;
    loop {
        let response = proxy
            .http()
            .get(proxy.api(&format!("/v1/docker-flow-proxy/reconfigure?{query}")))
            .send()
            .await
            .map_err(|error| error.to_string())?;
        let status = response.status();
        if status == StatusCode::OK {
            let _ = response.bytes().await;
            return Ok(());
        }
        let retry_after = response
            .headers()
            .get(reqwest::header::RETRY_AFTER)
            .and_then(|value| value.to_str().ok()?.parse::<u64>().ok())
            .map_or(Duration::from_secs(1), |secs| {
                Duration::from_secs(secs).min(Duration::from_secs(1))
            });
        let body = response.text().await.unwrap_or_default();
        if status != StatusCode::SERVICE_UNAVAILABLE || Instant::now() + retry_after > deadline {
            return Err(format!("{status}: {body}"));
        }
        busy.fetch_add(1, Ordering::Relaxed);
        tokio::time::sleep(retry_after).await;
    }
}

/// E (with G's figures during it): a burst of concurrent reconfigures of distinct services,
/// while two requests held open keep the HAProxy process that serves them busy.
async fn scenario_e(scale: &'static Scale, table: Table) {
    let hard_stop = format!("{}s", HARD_STOP_AFTER.as_secs());
    let stack = Stack::start(StackOptions {
        extra_args: vec!["--hard-stop-after".into(), hard_stop],
        ..StackOptions::default()
    })
    .await;
    let proxy: &ProxyClient = &stack.proxy;
    let (slow, arrived) = spawn_slow_backend().await;
    stack
        .registry
        .register_instance("hold", "hold-1", slow.port)
        .await;
    reconfigure_ok(proxy, "serviceName=hold&servicePath=/hold").await;
    wait_served(stack.port(), "/hold/quick").await;
    let held: Vec<_> = (0..2)
        .map(|_| tokio::spawn(held_request(stack.port(), "/hold/slow".into())))
        .collect();
    let deadline = Instant::now() + CHANGE_DEADLINE;
    while arrived.load(Ordering::Relaxed) < 2 {
        assert!(Instant::now() < deadline, "the held requests never arrive");
        tokio::time::sleep(POLL_PAUSE).await;
    }

    let pid = stack.proxy.pid();
    let peak = Arc::new(AtomicU64::new(resident_bytes(pid).unwrap_or(0)));
    let most_processes = Arc::new(AtomicUsize::new(0));
    let sampling = Arc::new(AtomicBool::new(true));
    let sampler = {
        let (peak, most_processes, sampling) =
            (peak.clone(), most_processes.clone(), sampling.clone());
        let data_dir = proxy.data_dir().to_path_buf();
        tokio::spawn(async move {
            while sampling.load(Ordering::Relaxed) {
                if let Some(rss) = resident_bytes(pid) {
                    peak.fetch_max(rss, Ordering::Relaxed);
                }
                let processes = fleet::haproxy_processes(&data_dir).len();
                most_processes.fetch_max(processes, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
    };
    let reloads = ReloadCounter::start(proxy).await;
    let cpu_before = cpu_time(pid);
    let started = Instant::now();
    let busy = AtomicUsize::new(0);
    let outcomes = futures::future::join_all((0..scale.e_burst).map(|index| {
        let busy = &busy;
        async move {
            let query = format!("serviceName=e{index:05}&servicePath=/e{index:05}");
            reconfigure_retrying_when_busy(proxy, &query, busy).await
        }
    }))
    .await;
    let took = started.elapsed();
    let cpu = cpu_before
        .zip(cpu_time(pid))
        .map(|(before, after)| after - before);
    sampling.store(false, Ordering::Relaxed);
    let _ = sampler.await;
    let reloads = reloads.since(proxy).await;
    let processes_after = fleet::haproxy_processes(proxy.data_dir()).len();
    let failures: Vec<&String> = outcomes.iter().filter_map(|o| o.as_ref().err()).collect();

    let mut figure = format!(
        "{}; {} answers 503 busy, retried after their Retry-After",
        seconds(took),
        busy.load(Ordering::Relaxed)
    );
    if let Some(first) = failures.first() {
        figure.push_str(&format!(
            "; {} not answered 200, e.g. {first}",
            failures.len()
        ));
    }
    table.push(
        "E",
        format!(
            "{} concurrent reconfigures of distinct services → all answered 200",
            scale.e_burst
        ),
        figure,
        "≤ 5 s, all 200",
        Met::from(took <= Duration::from_secs(5) && failures.is_empty()),
    );
    table.push(
        "E",
        "reloads during the burst",
        reload_figure(reloads),
        "≤ 20",
        Met::from(reloads.is_some_and(|n| n <= 20)),
    );
    let services = proxy.services().await;
    let routed = services.as_array().map_or(0, Vec::len);
    table.push(
        "E",
        "services listed by /services after the burst",
        format!("{routed}/{}", scale.e_burst + 1),
        "all",
        Met::from(routed == scale.e_burst + 1),
    );
    table.info(
        "G",
        format!(
            "flow-proxy peak RSS during E ({} reconfigures)",
            scale.e_burst
        ),
        megabytes(peak.load(Ordering::Relaxed)),
    );
    table.info(
        "G",
        "flow-proxy CPU during E",
        cpu.map_or_else(
            || "n/a".into(),
            |cpu| {
                format!(
                    "{} ({:.0}% of a core over {})",
                    seconds(cpu),
                    cpu.as_secs_f64() / took.as_secs_f64() * 100.0,
                    seconds(took)
                )
            },
        ),
    );
    table.info(
        "G",
        format!(
            "HAProxy processes alive during E, at most (2 requests held open; \
             --hard-stop-after {} s)",
            HARD_STOP_AFTER.as_secs()
        ),
        most_processes.load(Ordering::Relaxed).to_string(),
    );
    table.info(
        "G",
        "HAProxy processes alive right after E",
        processes_after.to_string(),
    );
    // Measured from the last answer: every old process has had its hard-stop-after, plus a
    // second for it to exit and be reaped.
    tokio::time::sleep(HARD_STOP_AFTER + Duration::from_secs(1)).await;
    let processes_later = fleet::haproxy_processes(proxy.data_dir()).len();
    table.push(
        "G",
        format!(
            "HAProxy processes alive {} s after E (--hard-stop-after {} s)",
            HARD_STOP_AFTER.as_secs() + 1,
            HARD_STOP_AFTER.as_secs()
        ),
        processes_later.to_string(),
        "1 (the serving one)",
        Met::from(processes_later == 1),
    );
    for request in held {
        request.abort();
    }
    drop(slow);
    stack.stop().await;
}

/// H: what flow-proxy asks of the registry, through a counting relay.
async fn scenario_h(scale: &'static Scale, table: Table) {
    let services = scale.h_services;
    let stack = Stack::start(StackOptions {
        services,
        relay: true,
        ..StackOptions::default()
    })
    .await;
    let restored = stack.wait_restored().await;
    assert!(
        restored.is_some(),
        "the {services} services are never served"
    );
    let relay = stack.relay.as_ref().expect("started with a relay");
    let pid = stack.proxy.pid();
    // Let the restore's own reads finish.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let before = relay.requests();
    let connections = report::connections_to(pid, relay.port());
    tokio::time::sleep(H_IDLE_WINDOW).await;
    let idle_requests = relay.requests() - before;
    let per_minute = idle_requests as f64 * 60.0 / H_IDLE_WINDOW.as_secs_f64();
    table.push(
        "H",
        format!("connections flow-proxy holds to the registry, idle, {services} services"),
        format!(
            "{} (the relay carries {})",
            connections.map_or_else(|| "n/a".into(), |n| n.to_string()),
            relay.open_connections()
        ),
        "≤ 5",
        Met::from(connections.is_some_and(|n| n <= 5)),
    );
    table.push(
        "H",
        format!("requests to the registry while idle, {services} services"),
        format!(
            "{idle_requests} in {} s ({per_minute:.0}/min)",
            H_IDLE_WINDOW.as_secs()
        ),
        "O(changes): ≤ 10/min",
        Met::from(per_minute <= 10.0),
    );

    let before = relay.requests();
    let mut most_connections = 0;
    let mut missed = 0;
    for k in 0..scale.h_changes {
        let index = (k * 7919) % services;
        let (name, path) = (service_name(index), stack.paths[index].clone());
        if scale_up_and_down(&stack, &name, &path, "bench", &format!("h{k}"))
            .await
            .is_none()
        {
            missed += 1;
        }
        most_connections =
            most_connections.max(report::connections_to(pid, relay.port()).unwrap_or(0));
    }
    let changes = 2 * scale.h_changes;
    let requests = relay.requests() - before;
    let per_change = requests as f64 / changes as f64;
    let mut figure = format!(
        "{per_change:.1} ({requests} for {changes} changes; up to {most_connections} \
         connections meanwhile)"
    );
    if missed > 0 {
        figure.push_str(&format!("; {missed} instances never served within 15 s"));
    }
    if relay.unfollowed_connections() > 0 {
        figure.push_str(&format!(
            "; {} connections not followed (chunked bodies): undercounted",
            relay.unfollowed_connections()
        ));
    }
    table.push(
        "H",
        format!("requests to the registry per instance change, {services} services"),
        figure,
        "O(changes): ≤ 10 per change",
        Met::from(per_change <= 10.0 && missed == 0),
    );
    table.info(
        "H",
        "connections the relay accepted over the whole run",
        relay.accepted_connections().to_string(),
    );
    stack.stop().await;
}

// ---- running it ----------------------------------------------------------------------------------

/// Runs one scenario as its own task, bounded by `budget`: a scenario that fails or overruns
/// gets a row saying so, and the others still run.
async fn isolated<Fut>(table: &Table, name: &str, budget: Duration, scenario: Fut)
where
    Fut: Future<Output = ()> + Send + 'static,
{
    let started = Instant::now();
    eprintln!("---- scenario {name} ----");
    let mut task = tokio::spawn(scenario);
    let outcome = match tokio::time::timeout(budget, &mut task).await {
        Ok(Ok(())) => None,
        Ok(Err(error)) if error.is_panic() => {
            let panic = error.into_panic();
            let message = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|text| text.to_string()))
                .unwrap_or_else(|| "a panic".into());
            Some(format!(
                "failed: {}",
                message.lines().next().unwrap_or_default()
            ))
        }
        Ok(Err(error)) => Some(format!("failed: {error}")),
        Err(_) => {
            task.abort();
            let _ = task.await;
            Some(format!(
                "stopped after its budget of {} s",
                budget.as_secs()
            ))
        }
    };
    if let Some(outcome) = outcome {
        table.push(name, "scenario did not finish", outcome, "", Met::No);
    }
    eprintln!("---- scenario {name}: {} ----", seconds(started.elapsed()));
}

fn machine() -> String {
    let haproxy = std::process::Command::new("haproxy")
        .arg("-v")
        .output()
        .ok()
        .and_then(|output| {
            String::from_utf8_lossy(&output.stdout)
                .lines()
                .next()
                .map(str::to_string)
        })
        .unwrap_or_else(|| "haproxy not found".into());
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let profile = if cfg!(debug_assertions) {
        "debug"
    } else {
        "release"
    };
    format!("{cores} cores; {haproxy}; {profile} build")
}

fn main() {
    let under_bench = std::env::args().any(|arg| arg == "--bench");
    let scale = match std::env::var("STACK_SCALE").ok().as_deref() {
        None if !under_bench => {
            eprintln!(
                "stack: nothing measured (run `cargo bench --bench stack`, or \
                 `STACK_SCALE=small cargo test --bench stack` for a quick check)"
            );
            return;
        }
        None | Some("full") => &FULL,
        Some("small") => &SMALL,
        Some(other) => {
            eprintln!("STACK_SCALE must be `small` or `full`, not `{other}`");
            std::process::exit(2);
        }
    };
    // `STACK_A_SIZES=10000`: A (and F, G) at these sizes only, e.g. to check one size.
    let scale: &'static Scale = match std::env::var("STACK_A_SIZES") {
        Ok(list) => {
            let sizes: Vec<usize> = list
                .split(',')
                .map(|size| {
                    size.trim()
                        .parse()
                        .expect("STACK_A_SIZES: numbers, comma-separated")
                })
                .filter(|size| *size > 0)
                .collect();
            assert!(!sizes.is_empty(), "STACK_A_SIZES names no size");
            Box::leak(Box::new(Scale {
                a_sizes: Box::leak(sizes.into_boxed_slice()),
                ..*scale
            }))
        }
        Err(_) => scale,
    };
    let only = std::env::var("STACK_ONLY").unwrap_or_else(|_| "ABCDEH".into());
    let wanted = |letter: char| only.to_ascii_uppercase().contains(letter);
    // Up to 10,000 watches of today's flow-proxy end in this process's registry.
    if let Err(error) = rlimit::increase_nofile_limit(u64::MAX) {
        eprintln!("could not raise the open-files limit: {error}");
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime");
    let table = Table::default();
    let started = std::time::Instant::now();
    runtime.block_on(async {
        // Caps for a scenario that hangs or crawls (together under 15 minutes), far above what
        // each takes when it works.
        let budget = Duration::from_secs;
        if wanted('A') || wanted('F') || wanted('G') {
            isolated(&table, "A", budget(420), scenario_a(scale, table.clone())).await;
        }
        if wanted('B') {
            isolated(&table, "B", budget(60), scenario_b(scale, table.clone())).await;
        }
        if wanted('C') {
            isolated(&table, "C", budget(60), scenario_c(scale, table.clone())).await;
        }
        if wanted('D') {
            isolated(&table, "D", budget(90), scenario_d(scale, table.clone())).await;
        }
        if wanted('E') || wanted('G') {
            isolated(&table, "E", budget(90), scenario_e(scale, table.clone())).await;
        }
        if wanted('H') {
            isolated(&table, "H", budget(150), scenario_h(scale, table.clone())).await;
        }
    });
    println!(
        "\nflow-proxy stack benchmark, scale {} ({}), {}",
        scale.name,
        machine(),
        seconds(started.elapsed())
    );
    println!("\n{}", table.markdown());
}
