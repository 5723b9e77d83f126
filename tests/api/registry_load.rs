//! What following the routed services' instances costs Consul: with 1,000 routed services
//! flow-proxy holds a handful of connections to the registry (far under real Consul's default of
//! 200 per client), and an instance that comes or goes is served or dropped through HAProxy
//! after a number of registry requests that does not grow with the routed services. With a check
//! the change detectors' answers name the service; without one (Registrator's default) flow-proxy
//! also lists the instances of each node (one node here), so that cost grows with the nodes.

use std::collections::BTreeSet;
use std::time::Duration;

use futures::StreamExt;
use tokio::time::Instant;

use crate::fleet::{eventually, ProxyProcess, SharedRegistry, KV_PREFIX};
use crate::helpers::spawn_backend;

/// How many services the test routes.
const SERVICES: usize = 1_000;

/// Registry writes in flight at once while storing the specs.
const CONCURRENT_WRITES: usize = 8;

/// The most connections flow-proxy may hold to the registry when idle (the target).
const IDLE_CONNECTIONS: usize = 5;

/// Registry requests one instance change may cost, counted per write (a registration with a
/// check and its passing are two): the two detectors' answers, one catch-up read of the checks,
/// the node listings (two with one node), a read of the service per round; about 10 at most,
/// with room to spare. Nothing in it grows with the routed services.
const REQUESTS_PER_CHANGE: u64 = 16;

/// How long one instance change may take to reach HAProxy.
const LIVE: Duration = Duration::from_secs(10);

fn service(index: usize) -> String {
    format!("svc-{index}")
}

/// The spec a reconfigure with `serviceName=<service>&servicePath=/<service>` stores.
fn stored_spec(service: &str) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({
        "ServiceName": service,
        "ServiceDest": [{ "Index": 0, "ServicePath": [format!("/{service}")] }]
    }))
    .expect("spec JSON")
}

/// The requests flow-proxy sent to follow instances: every health and catalog read (the test
/// itself only registers, deregisters and passes checks, under `/v1/agent/`).
fn instance_requests(registry: &SharedRegistry) -> u64 {
    registry
        .request_counts()
        .iter()
        .filter(|(path, _)| path.starts_with("/v1/health/") || path.starts_with("/v1/catalog/"))
        .map(|(_, count)| count)
        .sum()
}

/// The instance requests once none has been sent for a second (at most 60 s).
async fn quiet_instance_requests(registry: &SharedRegistry) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut last = instance_requests(registry);
    let mut unchanged_since = Instant::now();
    loop {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let now = instance_requests(registry);
        if now != last {
            last = now;
            unchanged_since = Instant::now();
        } else if unchanged_since.elapsed() >= Duration::from_secs(1) {
            return last;
        }
        assert!(
            Instant::now() < deadline,
            "flow-proxy never stops reading the registry"
        );
    }
}

/// The established TCP connections process `pid` holds to `port` (its socket descriptors,
/// matched with the kernel's TCP tables by inode).
fn connections_to(pid: u32, port: u16) -> usize {
    let sockets: BTreeSet<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("the process's descriptors")
        .filter_map(|entry| std::fs::read_link(entry.ok()?.path()).ok())
        .filter_map(|target| {
            let target = target.to_string_lossy().into_owned();
            let inode = target.strip_prefix("socket:[")?.strip_suffix(']')?;
            Some(inode.to_string())
        })
        .collect();
    let mut count = 0;
    for table in ["tcp", "tcp6"] {
        let Ok(text) = std::fs::read_to_string(format!("/proc/{pid}/net/{table}")) else {
            continue;
        };
        for line in text.lines().skip(1) {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let (Some(remote), Some(state), Some(inode)) =
                (fields.get(2), fields.get(3), fields.get(9))
            else {
                continue;
            };
            let remote_port = remote
                .rsplit(':')
                .next()
                .and_then(|hex| u16::from_str_radix(hex, 16).ok());
            // 01: ESTABLISHED.
            if *state == "01" && remote_port == Some(port) && sockets.contains(*inode) {
                count += 1;
            }
        }
    }
    count
}

fn registry_port(registry: &SharedRegistry) -> u16 {
    registry
        .address()
        .rsplit(':')
        .next()
        .and_then(|port| port.parse().ok())
        .expect("the registry's port")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_routed_services_cost_a_few_connections_and_requests_per_change_not_per_service()
{
    let registry = SharedRegistry::start().await;
    let checked = service(0);
    let plain = service(SERVICES - 1);
    let checked_one = spawn_backend("checked-one").await;
    let plain_one = spawn_backend("plain-one").await;
    registry
        .register_instance_with_ttl_check(&checked, "checked-1", checked_one.port)
        .await;
    registry
        .register_instance(&plain, "plain-1", plain_one.port)
        .await;
    let url = registry.url();
    let client = crate::proxy_client::http_client();
    futures::stream::iter(0..SERVICES)
        .map(|index| {
            let (client, url) = (&client, &url);
            async move {
                let name = service(index);
                let response = client
                    .put(format!("{url}/v1/kv/{KV_PREFIX}/services/{name}"))
                    .body(stored_spec(&name))
                    .send()
                    .await
                    .expect("the registry stores the spec");
                assert!(response.status().is_success(), "storing {name}");
            }
        })
        .buffer_unordered(CONCURRENT_WRITES)
        .collect::<Vec<()>>()
        .await;

    let proxy = ProxyProcess::start(&registry.address(), &[]).await;
    eventually(
        "flow-proxy restores every stored service",
        Duration::from_secs(60),
        || async { proxy.services().await.as_array().map(Vec::len) == Some(SERVICES) },
    )
    .await;
    for (name, backend) in [(&checked, "checked-one"), (&plain, "plain-one")] {
        eventually(&format!("{name} is served by {backend}"), LIVE, || async {
            proxy
                .names_answering(&format!("/{name}/x"), None, 1)
                .await
                .contains(&backend.to_string())
        })
        .await;
    }

    // Idle: a few connections, whatever the number of routed services.
    let mut requests = quiet_instance_requests(&registry).await;
    let restored = requests;
    let idle_connections = connections_to(proxy.pid(), registry_port(&registry));
    assert!(
        idle_connections <= IDLE_CONNECTIONS,
        "flow-proxy holds {idle_connections} connections to the registry with {SERVICES} \
         routed services"
    );

    // An instance with a check comes and goes: only that service is read.
    let checked_two = spawn_backend("checked-two").await;
    registry
        .register_instance_with_ttl_check(&checked, "checked-2", checked_two.port)
        .await;
    eventually("the new checked instance is served", LIVE, || async {
        proxy
            .names_answering(&format!("/{checked}/x"), None, 4)
            .await
            .contains(&"checked-two".to_string())
    })
    .await;
    let after = quiet_instance_requests(&registry).await;
    let checked_registered = after - requests;
    requests = after;
    registry.deregister_instance("checked-2").await;
    eventually(
        "the deregistered checked instance is dropped",
        LIVE,
        || async {
            let answering = proxy
                .names_answering(&format!("/{checked}/x"), None, 4)
                .await;
            !answering.is_empty() && answering.iter().all(|name| name == "checked-one")
        },
    )
    .await;
    let after = quiet_instance_requests(&registry).await;
    let checked_deregistered = after - requests;
    requests = after;
    for (what, cost) in [
        ("registering", checked_registered),
        ("deregistering", checked_deregistered),
    ] {
        assert!(
            cost <= REQUESTS_PER_CHANGE,
            "{what} an instance with a check cost {cost} registry requests with {SERVICES} \
             routed services"
        );
    }

    // An instance with a check of a service nobody routes: nothing routed is read.
    let elsewhere = spawn_backend("elsewhere").await;
    registry
        .register_instance_with_ttl_check("unrouted", "unrouted-1", elsewhere.port)
        .await;
    let after = quiet_instance_requests(&registry).await;
    let unrouted_registered = after - requests;
    requests = after;
    assert!(
        unrouted_registered <= REQUESTS_PER_CHANGE,
        "registering an instance with a check of an unrouted service cost \
         {unrouted_registered} registry requests"
    );

    // An instance without a check comes and goes: the node listings name its service.
    let plain_two = spawn_backend("plain-two").await;
    registry
        .register_instance(&plain, "plain-2", plain_two.port)
        .await;
    eventually("the new plain instance is served", LIVE, || async {
        proxy
            .names_answering(&format!("/{plain}/x"), None, 4)
            .await
            .contains(&"plain-two".to_string())
    })
    .await;
    let after = quiet_instance_requests(&registry).await;
    let plain_registered = after - requests;
    requests = after;
    registry.deregister_instance("plain-2").await;
    eventually(
        "the deregistered plain instance is dropped",
        LIVE,
        || async {
            let answering = proxy.names_answering(&format!("/{plain}/x"), None, 4).await;
            !answering.is_empty() && answering.iter().all(|name| name == "plain-one")
        },
    )
    .await;
    let plain_deregistered = quiet_instance_requests(&registry).await - requests;
    for (what, cost) in [
        ("registering", plain_registered),
        ("deregistering", plain_deregistered),
    ] {
        assert!(
            cost <= REQUESTS_PER_CHANGE,
            "{what} an instance without a check cost {cost} registry requests with {SERVICES} \
             routed services"
        );
    }
    let connections = connections_to(proxy.pid(), registry_port(&registry));
    assert!(
        connections <= IDLE_CONNECTIONS,
        "after the reads, flow-proxy holds {connections} connections to the registry"
    );
    println!(
        "registry load with {SERVICES} routed services: {restored} requests from start to idle, \
         {idle_connections} connections idle \
         ({connections} after the changes); requests per instance change with a check: \
         {checked_registered} to register (and pass its check), {checked_deregistered} to \
         deregister, {unrouted_registered} for an unrouted service; without a check: \
         {plain_registered} to register, {plain_deregistered} to deregister"
    );
}
