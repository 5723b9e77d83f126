//! Concurrent chaos: 50 clients change 20 services at random through one flow-proxy process
//! while its HAProxy is SIGKILLed and the registry it uses is stopped and restarted at random.
//! Once the faults stop and everything has settled, KV, `/services` and the routes HAProxy
//! really serves must agree on every service, checked with requests.
//!
//! `CHAOS_SEED` replays a run (the seed is printed), `CHAOS_SECONDS` changes its length (30 by
//! default). Run it with `--nocapture` to see the figures RELIABILITY.md records.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::fleet::{
    disagreements, eventually, quiescent, versioned_path, ProxyProcess, SharedRegistry,
};
use crate::helpers::{spawn_backend, Backend};
use crate::proxy_client::http_client;

/// How many services the clients change.
const SERVICES: usize = 20;

/// How many clients change them at once.
const CLIENTS: usize = 50;

/// How many different paths (`/v<k>/<service>`) a reconfigure picks from.
pub const VERSIONS: u32 = 4;

/// The chaos lasts this long unless `CHAOS_SECONDS` says otherwise.
const DEFAULT_SECONDS: u64 = 30;

/// How long KV, `/services` and `/config` must stay unchanged to count as settled.
const CALM: Duration = Duration::from_secs(3);

/// How long settling may take after the faults stop.
const SETTLE_TIMEOUT: Duration = Duration::from_secs(60);

/// `svc-00`, `svc-01`, …: names of equal length, so no route's path is a prefix of another's.
pub fn service_names(count: usize) -> Vec<String> {
    (0..count).map(|index| format!("svc-{index:02}")).collect()
}

/// Starts a backend for each service, answering with the service's name, and registers it as
/// the service's one instance.
pub async fn backends_for(registry: &SharedRegistry, services: &[String]) -> Vec<Backend> {
    let mut backends = Vec::with_capacity(services.len());
    for service in services {
        let backend = spawn_backend(service).await;
        registry
            .register_instance(service, &format!("{service}-1"), backend.port)
            .await;
        backends.push(backend);
    }
    backends
}

/// Answers counted by kind (`reconfigure 200`, `remove 404`, `reconfigure no answer`, …), with
/// the first message of each kind of server error.
#[derive(Default, Clone)]
pub struct Tally(
    Arc<Mutex<BTreeMap<String, u64>>>,
    Arc<Mutex<BTreeMap<String, String>>>,
);

impl Tally {
    fn count(&self, what: String) {
        *self.0.lock().expect("tally lock").entry(what).or_default() += 1;
    }

    fn example(&self, what: String, message: String) {
        let mut examples = self.1.lock().expect("tally lock");
        examples.entry(what).or_insert(message);
    }

    /// The first message seen of each kind of server error.
    pub fn examples(&self) -> BTreeMap<String, String> {
        self.1.lock().expect("tally lock").clone()
    }

    /// Every kind with its count, and the total.
    pub fn summary(&self) -> (BTreeMap<String, u64>, u64) {
        let counts = self.0.lock().expect("tally lock").clone();
        let total = counts.values().sum();
        (counts, total)
    }

    /// How many answers of this kind were seen.
    pub fn get(&self, what: &str) -> u64 {
        self.0
            .lock()
            .expect("tally lock")
            .get(what)
            .copied()
            .unwrap_or(0)
    }
}

/// Sends one random change to the flow-proxy API at `api` (`http://<address>`): a reconfigure
/// of a random service at a random version's path (two times in three) or its removal; counts
/// the answer in `tally`. A connection refused counts as `refused`; one that breaks before the
/// answer (the change was in flight) as `no answer`.
pub async fn random_change(
    client: &reqwest::Client,
    api: &str,
    services: &[String],
    rng: &mut StdRng,
    tally: &Tally,
) {
    let service = &services[rng.random_range(0..services.len())];
    let (kind, url) = if rng.random_ratio(2, 3) {
        let path = versioned_path(service, rng.random_range(0..VERSIONS));
        (
            "reconfigure",
            format!(
                "{api}/v1/docker-flow-proxy/reconfigure?serviceName={service}&servicePath={path}"
            ),
        )
    } else {
        (
            "remove",
            format!("{api}/v1/docker-flow-proxy/remove?serviceName={service}"),
        )
    };
    match client.get(&url).send().await {
        Ok(response) => {
            let what = format!("{kind} {}", response.status().as_u16());
            if response.status().is_server_error() {
                let message = response.text().await.unwrap_or_default();
                tally.example(what.clone(), message);
            }
            tally.count(what);
        }
        Err(error) if error.is_connect() => tally.count(format!("{kind} refused")),
        Err(_) => tally.count(format!("{kind} no answer")),
    }
}

/// The seed of this run: `CHAOS_SEED` or a random one.
fn seed() -> u64 {
    std::env::var("CHAOS_SEED")
        .ok()
        .map(|seed| seed.parse().expect("CHAOS_SEED is a number"))
        .unwrap_or_else(rand::random)
}

fn chaos_duration() -> Duration {
    let seconds = std::env::var("CHAOS_SECONDS")
        .ok()
        .map(|seconds| seconds.parse().expect("CHAOS_SECONDS is a number"))
        .unwrap_or(DEFAULT_SECONDS);
    Duration::from_secs(seconds)
}

/// SIGKILLs the HAProxy process that answers on `stats_socket`; whether one did.
async fn kill_serving_haproxy(stats_socket: &std::path::Path) -> bool {
    let Some(pid) = flow_proxy::haproxy::serving_pid(stats_socket).await else {
        return false;
    };
    let pid = libc::pid_t::try_from(pid).expect("a pid fits pid_t");
    // SAFETY: kill(2) has no memory-safety preconditions; the pid is the HAProxy this test's
    // flow-proxy started (it just answered on its stats socket).
    unsafe {
        libc::kill(pid, libc::SIGKILL);
    }
    true
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kv_services_and_haproxy_agree_after_chaos() {
    let seed = seed();
    let duration = chaos_duration();
    println!("chaos: seed {seed} (CHAOS_SEED={seed} replays it), {duration:?}");
    let mut registry = SharedRegistry::start().await;
    let services = service_names(SERVICES);
    let _backends = backends_for(&registry, &services).await;
    let proxy = ProxyProcess::start(&registry.address(), &[]).await;
    let api = proxy.api("");
    let stats_socket = proxy
        .data_dir()
        .canonicalize()
        .expect("the data directory exists")
        .join("haproxy.sock");

    let tally = Tally::default();
    let deadline = tokio::time::Instant::now() + duration;
    let mut clients = Vec::with_capacity(CLIENTS);
    for client_number in 0..CLIENTS as u64 {
        let (api, services, tally) = (api.clone(), services.clone(), tally.clone());
        clients.push(tokio::spawn(async move {
            let mut rng = StdRng::seed_from_u64(seed.wrapping_add(client_number + 1));
            let client = http_client();
            while tokio::time::Instant::now() < deadline {
                random_change(&client, &api, &services, &mut rng, &tally).await;
            }
        }));
    }

    // The faults, from their own seeded sequence, one at a time.
    let mut rng = StdRng::seed_from_u64(seed);
    let mut haproxy_kills = 0;
    let mut registry_restarts = 0;
    let mut registry_down = Duration::ZERO;
    loop {
        let pause = Duration::from_millis(rng.random_range(500..2_500));
        if tokio::time::Instant::now() + pause >= deadline {
            break;
        }
        tokio::time::sleep(pause).await;
        if rng.random_bool(0.5) {
            if kill_serving_haproxy(&stats_socket).await {
                haproxy_kills += 1;
            }
        } else {
            let outage = Duration::from_millis(rng.random_range(100..2_000));
            registry.stop().await;
            tokio::time::sleep(outage).await;
            registry.restart().await;
            registry_restarts += 1;
            registry_down += outage;
        }
    }
    for client in clients {
        client.await.expect("a client task");
    }

    // Healed: the registry runs; HAProxy serves again (its supervisor restarts it).
    eventually(
        "HAProxy answers on its stats socket",
        Duration::from_secs(20),
        || async {
            flow_proxy::haproxy::serving_pid(&stats_socket)
                .await
                .is_some()
        },
    )
    .await;
    let settled_in = quiescent(&registry, &proxy, CALM, SETTLE_TIMEOUT).await;
    let (mismatches, requests) = disagreements(&registry, &proxy, &services, VERSIONS).await;

    let (answers, operations) = tally.summary();
    println!(
        "chaos: {CLIENTS} clients, {SERVICES} services, {duration:?}: {operations} operations; \
         faults: {haproxy_kills} HAProxy SIGKILLs, {registry_restarts} registry restarts \
         ({registry_down:?} down in all); settled {settled_in:?} after the chaos; checker: \
         {requests} requests through HAProxy, {} mismatches",
        mismatches.len()
    );
    for (answer, count) in &answers {
        println!("chaos: answers {answer}: {count}");
    }
    for (answer, message) in tally.examples() {
        println!("chaos: e.g. {answer}: {message}");
    }
    for mismatch in &mismatches {
        println!("chaos: MISMATCH {mismatch}");
    }
    assert!(
        mismatches.is_empty(),
        "seed {seed}: KV, /services and HAProxy disagree:\n{}",
        mismatches.join("\n")
    );
    assert!(
        tally.get("reconfigure 200") > 0 && haproxy_kills + registry_restarts > 0,
        "seed {seed}: the run applied changes and injected faults"
    );
}
