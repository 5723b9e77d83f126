//! The stack a scenario runs on and what every scenario asks of it: the registry seeded with
//! stored specs and instances, the flow-proxy process (optionally behind a counting relay),
//! reloads read from `/metrics`, reconfigures timed from call to answer, and polls through
//! HAProxy until a route, an instance or a color is served.

use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use futures::StreamExt;
use reqwest::StatusCode;
use serde_json::json;
use tokio::time::Instant;

use crate::fleet::{ProxyOptions, ProxyProcess, SharedRegistry, KV_PREFIX};
use crate::helpers::{spawn_backend, Backend};
use crate::load::{get_once, served};
use crate::proxy_client::ProxyClient;
use crate::relay::CountingRelay;
use crate::report::{cpu_time, seconds};

/// Each kind of change in A is sampled at least this often, whatever the budget.
pub const MIN_SAMPLES: usize = 3;

/// How long one wait for a route, an instance or a color may take before it counts as failed.
pub const CHANGE_DEADLINE: Duration = Duration::from_secs(15);

/// How long a restore of stored specs may take before the scenario gives up.
pub const RESTORE_DEADLINE: Duration = Duration::from_secs(300);

/// The pause between two polls through HAProxy while waiting for a change: the resolution of
/// B's and C's figures, and what keeps the poller from taking a whole core.
pub const POLL_PAUSE: Duration = Duration::from_millis(1);

/// "1 service", "N services".
pub fn services(count: usize) -> String {
    if count == 1 {
        "1 service".into()
    } else {
        format!("{count} services")
    }
}

/// The name of the `index`th seeded service: fixed width, so no service's path is a prefix of
/// another's.
pub fn service_name(index: usize) -> String {
    format!("s{index:05}")
}

/// One scenario's stack: the registry, optionally a counting relay in front of it, a backend
/// every seeded service has one instance on, and the flow-proxy process.
pub struct Stack {
    pub registry: SharedRegistry,
    pub relay: Option<CountingRelay>,
    pub backend: Backend,
    pub proxy: ProxyProcess,
    /// When the flow-proxy process was started.
    pub started: Instant,
    /// The seeded services' current paths, by index.
    pub paths: Vec<String>,
    /// How long storing the specs and registering their instances took.
    pub seeding: Duration,
}

/// What a [`Stack`] starts with.
#[derive(Default)]
pub struct StackOptions {
    /// Services stored in KV (and with one instance each) before flow-proxy starts.
    pub services: usize,
    /// Put a counting relay between flow-proxy and the registry.
    pub relay: bool,
    /// More flags for flow-proxy.
    pub extra_args: Vec<String>,
}

impl Stack {
    /// Starts the registry and the backend, seeds them, then starts flow-proxy; returns once
    /// flow-proxy answers its ping (it has restored what was seeded).
    pub async fn start(options: StackOptions) -> Stack {
        let registry = SharedRegistry::start().await;
        let backend = spawn_backend("bench").await;
        let seeding_started = Instant::now();
        let paths = seed(&registry, options.services, backend.port).await;
        let seeding = seeding_started.elapsed();
        if options.services > 0 {
            eprintln!(
                "stored {n} specs and registered {n} instances in {}",
                seconds(seeding),
                n = options.services
            );
        }
        let relay = if options.relay {
            let upstream: SocketAddr = registry.address().parse().expect("an address");
            Some(CountingRelay::start(upstream).await)
        } else {
            None
        };
        let address = relay
            .as_ref()
            .map_or_else(|| registry.address(), CountingRelay::address);
        // Room for A's new services beyond 10,000.
        let mut extra_args = vec!["--max-services".to_string(), "30000".to_string()];
        extra_args.extend(options.extra_args);
        let started = Instant::now();
        let proxy = ProxyProcess::start_with(
            &address,
            ProxyOptions {
                extra_args,
                // It answers its ping once every stored spec is restored.
                ready_timeout: Some(RESTORE_DEADLINE),
                ..ProxyOptions::default()
            },
        )
        .await;
        eprintln!(
            "flow-proxy (pid {}) answered its ping {} after its start",
            proxy.pid(),
            seconds(started.elapsed())
        );
        Stack {
            registry,
            relay,
            backend,
            proxy,
            started,
            paths,
            seeding,
        }
    }

    /// HAProxy's HTTP port.
    pub fn port(&self) -> u16 {
        self.proxy.http_port
    }

    /// Waits until a sample of the seeded routes (the last, then the first and about 200
    /// between, 16 polled at a time) answers 200; returns the time from the process start to the
    /// last of them being served, `None` past the deadline.
    pub async fn wait_restored(&self) -> Option<Duration> {
        let count = self.paths.len();
        if count == 0 {
            return Some(self.started.elapsed());
        }
        let (port, started) = (self.port(), self.started);
        // The last one alone first: nothing is polled hard while HAProxy is not up yet.
        let last = poll_until_served(port, &self.paths[count - 1], started).await?;
        let step = (count / 200).max(1);
        let sample: Vec<String> = self.paths.iter().step_by(step).cloned().collect();
        let times: Vec<Option<Duration>> = futures::stream::iter(sample)
            .map(|path| async move { poll_until_served(port, &path, started).await })
            .buffer_unordered(16)
            .collect()
            .await;
        times
            .into_iter()
            .try_fold(last, |latest, time| Some(latest.max(time?)))
    }

    /// How many seeded routes answer 200 now (each asked once).
    pub async fn routes_served(&self) -> usize {
        let port = self.port();
        futures::stream::iter(self.paths.clone())
            .map(|path| async move { served(port, &path).await })
            .buffer_unordered(16)
            .filter(|ok| futures::future::ready(*ok))
            .count()
            .await
    }

    /// Stops flow-proxy with SIGTERM (and checks that its HAProxy went with it).
    pub async fn stop(mut self) {
        self.proxy.stop().await;
    }
}

/// Stores `count` specs in KV the way flow-proxy stores a reconfigured service, each with one
/// instance on `port` in the catalog; returns their paths. Over a few kept-alive connections
/// (the harness's usual client opens one per request, which would leave tens of thousands of
/// sockets in TIME_WAIT at 10,000 services).
pub async fn seed(registry: &SharedRegistry, count: usize, port: u16) -> Vec<String> {
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .expect("HTTP client");
    let url = registry.url();
    let put = |path: String, body: String| {
        let request = client.put(format!("{url}{path}")).body(body);
        async move {
            let response = request
                .send()
                .await
                .unwrap_or_else(|error| panic!("the registry answers PUT {path}: {error}"));
            let status = response.status();
            assert_eq!(status, StatusCode::OK, "PUT {path}");
        }
    };
    futures::stream::iter(0..count)
        .for_each_concurrent(16, |index| {
            let name = service_name(index);
            let spec = json!({
                "ServiceName": name,
                "ServiceDest": [{"Index": 0, "ServicePath": [format!("/{name}")]}]
            });
            let registration = json!({
                "ID": format!("{name}-1"), "Name": name, "Port": port, "Address": "127.0.0.1",
                "Check": null, "Checks": null
            });
            let stored = put(
                format!("/v1/kv/{KV_PREFIX}/services/{name}"),
                spec.to_string(),
            );
            let registered = put(
                "/v1/agent/service/register".to_string(),
                registration.to_string(),
            );
            async move {
                stored.await;
                registered.await;
            }
        })
        .await;
    (0..count)
        .map(|index| format!("/{}", service_name(index)))
        .collect()
}

/// HAProxy reloads so far, from `/metrics` (`flow_proxy_haproxy_reloads_total`, all results);
/// `None` when the metric is not there.
pub async fn reloads(proxy: &ProxyClient) -> Option<u64> {
    let text = proxy
        .http()
        .get(proxy.api("/metrics"))
        .send()
        .await
        .ok()?
        .text()
        .await
        .ok()?;
    let values: Vec<u64> = text
        .lines()
        .filter(|line| line.starts_with("flow_proxy_haproxy_reloads_total"))
        .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
        .map(|value| value as u64)
        .collect();
    (!values.is_empty()).then(|| values.iter().sum())
}

/// Counts reloads from a starting point.
pub struct ReloadCounter(Option<u64>);

impl ReloadCounter {
    pub async fn start(proxy: &ProxyClient) -> ReloadCounter {
        ReloadCounter(reloads(proxy).await)
    }

    pub async fn since(&self, proxy: &ProxyClient) -> Option<u64> {
        Some(reloads(proxy).await?.saturating_sub(self.0?))
    }
}

pub fn reload_figure(count: Option<u64>) -> String {
    count.map_or_else(|| "n/a (no reload metric)".to_string(), |n| n.to_string())
}

/// `GET /v1/docker-flow-proxy/reconfigure?<query>`: how long until answered, and the error
/// (status and body) when it was not a 200.
pub async fn timed_reconfigure(proxy: &ProxyClient, query: &str) -> (Duration, Result<(), String>) {
    let started = Instant::now();
    let outcome = match proxy
        .http()
        .get(proxy.api(&format!("/v1/docker-flow-proxy/reconfigure?{query}")))
        .send()
        .await
    {
        Ok(response) if response.status() == StatusCode::OK => {
            // The answer is complete once its body is read.
            let _ = response.bytes().await;
            Ok(())
        }
        Ok(response) => Err(format!(
            "{}: {}",
            response.status(),
            response.text().await.unwrap_or_default()
        )),
        Err(error) => Err(error.to_string()),
    };
    (started.elapsed(), outcome)
}

pub async fn reconfigure_ok(proxy: &ProxyClient, query: &str) {
    let (_, outcome) = timed_reconfigure(proxy, query).await;
    if let Err(why) = outcome {
        panic!("reconfigure?{query}: {why}");
    }
}

/// Polls `path` every 10 ms until it answers 200; the time from `since` to that answer (`None`
/// past [`RESTORE_DEADLINE`] from `since`).
pub async fn poll_until_served(port: u16, path: &str, since: Instant) -> Option<Duration> {
    let deadline = since + RESTORE_DEADLINE;
    loop {
        if served(port, path).await {
            return Some(since.elapsed());
        }
        if Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Polls `path` until it answers 200 (at most [`CHANGE_DEADLINE`]).
pub async fn wait_served(port: u16, path: &str) {
    let deadline = Instant::now() + CHANGE_DEADLINE;
    while !served(port, path).await {
        assert!(Instant::now() < deadline, "{path} is never served");
        tokio::time::sleep(POLL_PAUSE).await;
    }
}

/// Polls `path` until `run` answers in a row come from backend `name`; returns the time from
/// `since` to the first answer of that run (`None` past [`CHANGE_DEADLINE`]).
pub async fn wait_all_from(
    port: u16,
    path: &str,
    name: &str,
    run: usize,
    since: Instant,
) -> Option<Duration> {
    let deadline = since + CHANGE_DEADLINE;
    let mut first_of_run: Option<Duration> = None;
    let mut in_a_row = 0;
    while Instant::now() < deadline {
        let at = since.elapsed();
        match get_once(port, path).await {
            Ok(answer) if answer.status == StatusCode::OK && answer.backend() == name => {
                first_of_run.get_or_insert(at);
                in_a_row += 1;
                if in_a_row >= run {
                    return first_of_run;
                }
                continue;
            }
            _ => {
                first_of_run = None;
                in_a_row = 0;
            }
        }
        tokio::time::sleep(POLL_PAUSE).await;
    }
    None
}

/// Polls `path` until backend `name` answers once; the time from `since` (`None` past
/// [`CHANGE_DEADLINE`]).
pub async fn wait_first_from(
    port: u16,
    path: &str,
    name: &str,
    since: Instant,
) -> Option<Duration> {
    let deadline = since + CHANGE_DEADLINE;
    while Instant::now() < deadline {
        if let Ok(answer) = get_once(port, path).await {
            if answer.status == StatusCode::OK && answer.backend() == name {
                return Some(since.elapsed());
            }
        }
        tokio::time::sleep(POLL_PAUSE).await;
    }
    None
}

/// One scale event on `service` (routed at `path`, with instances on backend `base`): a new
/// instance on a new backend `label` is registered; returns the time from the registry's
/// answer until HAProxy serves a request from it; then it is deregistered and gone again.
pub async fn scale_up_and_down(
    stack: &Stack,
    service: &str,
    path: &str,
    base: &str,
    label: &str,
) -> Option<Duration> {
    let backend = spawn_backend(label).await;
    let id = format!("{service}-{label}");
    stack
        .registry
        .register_instance(service, &id, backend.port)
        .await;
    let registered = Instant::now();
    let served_after = wait_first_from(stack.port(), path, label, registered).await;
    stack.registry.deregister_instance(&id).await;
    // Round robin over the remaining instances: 8 answers in a row from the base backend
    // mean the new one is out.
    let gone = wait_all_from(stack.port(), path, base, 8, Instant::now()).await;
    assert!(
        gone.is_some(),
        "{id} is still served after its deregistration"
    );
    served_after
}

/// Takes samples of `measure(k)` for k = 0, 1, …: at most `max`, and none after `budget` once
/// [`MIN_SAMPLES`] are taken.
pub async fn sampled<F, Fut>(max: usize, budget: Duration, mut measure: F) -> Vec<Duration>
where
    F: FnMut(usize) -> Fut,
    Fut: Future<Output = Duration>,
{
    let started = Instant::now();
    let mut samples = Vec::new();
    while samples.len() < max && (samples.len() < MIN_SAMPLES || started.elapsed() < budget) {
        samples.push(measure(samples.len()).await);
    }
    samples
}

/// flow-proxy's CPU use over `window` while nothing happens, as a share of one core.
pub async fn idle_cpu(pid: u32, window: Duration) -> Option<f64> {
    let before = cpu_time(pid)?;
    // Measuring idleness is waiting: nothing to poll for.
    tokio::time::sleep(window).await;
    let after = cpu_time(pid)?;
    Some((after - before).as_secs_f64() / window.as_secs_f64())
}
