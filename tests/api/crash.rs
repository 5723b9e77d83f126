//! flow-proxy SIGKILLed in the middle of a burst of changes: the HAProxy it leaves behind keeps
//! serving while it is down, and the flow-proxy restarted on the same data directory and ports
//! takes that HAProxy over (no second HAProxy, no port conflict) and ends up with KV, `/services`
//! and the routes HAProxy serves agreeing on every service: each interrupted change is either
//! fully there or fully absent.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use reqwest::StatusCode;
use tempfile::TempDir;

use crate::chaos::{backends_for, random_change, service_names, Tally, VERSIONS};
use crate::fleet::{
    disagreements, eventually, haproxy_processes, kill_processes, parent_pid, quiescent,
    versioned_path, ProxyOptions, ProxyProcess, SharedRegistry,
};
use crate::helpers::{free_port, spawn_backend};
use crate::proxy_client::http_client;

/// How many services the burst changes.
const SERVICES: usize = 12;

/// How many clients send changes at once.
const CLIENTS: usize = 24;

/// Changes answered before the kill, so that it lands in a burst in full swing.
const ANSWERED_BEFORE_KILL: u64 = 20;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flow_proxy_killed_mid_burst_restarts_into_agreement_with_kv_and_haproxy() {
    let seed: u64 = std::env::var("CRASH_SEED")
        .ok()
        .map(|seed| seed.parse().expect("CRASH_SEED is a number"))
        .unwrap_or_else(rand::random);
    println!("crash: seed {seed} (CRASH_SEED={seed} replays the choices)");
    let registry = SharedRegistry::start().await;
    let services = service_names(SERVICES);
    let _backends = backends_for(&registry, &services).await;
    let steady = spawn_backend("steady").await;
    registry
        .register_instance("steady", "steady-1", steady.port)
        .await;

    let data_dir = TempDir::new().expect("a data directory both flow-proxies use");
    let options = ProxyOptions {
        data_dir: Some(data_dir.path().to_path_buf()),
        http_port: Some(free_port()),
        ..ProxyOptions::default()
    };
    let mut first = ProxyProcess::start_with(&registry.address(), options.clone()).await;
    first
        .reconfigure_ok("serviceName=steady&servicePath=/steady")
        .await;
    for service in services.iter().step_by(2) {
        let path = versioned_path(service, 0);
        first
            .reconfigure_ok(&format!("serviceName={service}&servicePath={path}"))
            .await;
    }

    // The burst: every client sends random changes until flow-proxy is gone.
    let tally = Tally::default();
    let stop = Arc::new(AtomicBool::new(false));
    let api = first.api("");
    let mut clients = Vec::with_capacity(CLIENTS);
    for client_number in 0..CLIENTS as u64 {
        let (api, services, tally, stop) =
            (api.clone(), services.clone(), tally.clone(), stop.clone());
        clients.push(tokio::spawn(async move {
            let mut rng = StdRng::seed_from_u64(seed.wrapping_add(client_number + 1));
            let client = http_client();
            while !stop.load(Ordering::Relaxed) {
                random_change(&client, &api, &services, &mut rng, &tally).await;
            }
        }));
    }
    eventually(
        "the burst is under way",
        Duration::from_secs(30),
        || async { tally.summary().1 >= ANSWERED_BEFORE_KILL },
    )
    .await;
    let mut rng = StdRng::seed_from_u64(seed);
    tokio::time::sleep(Duration::from_millis(rng.random_range(0..300))).await;
    first.kill().await;
    stop.store(true, Ordering::Relaxed);
    for client in clients {
        client.await.expect("a client task");
    }
    let (before_kill, answered_before_kill) = tally.summary();
    let interrupted = tally.get("reconfigure no answer") + tally.get("remove no answer");
    assert!(
        interrupted > 0,
        "the kill interrupted changes in flight: {before_kill:?}"
    );

    // flow-proxy is down; the HAProxy it left serves on.
    let orphans = haproxy_processes(data_dir.path());
    assert!(
        !orphans.is_empty(),
        "the HAProxy of the killed flow-proxy keeps running"
    );
    let (status, body) = first.get_through_proxy("/steady/x", None).await;
    assert_eq!(
        (status, body.as_str()),
        (StatusCode::OK, "steady /steady/x"),
        "HAProxy serves while flow-proxy is down"
    );

    // Restarted on the same data directory and ports, it takes that HAProxy over.
    let second = ProxyProcess::start_with(&registry.address(), options).await;
    eventually(
        "exactly one HAProxy serves from the data directory, started by the new flow-proxy",
        Duration::from_secs(20),
        || async {
            let running = haproxy_processes(data_dir.path());
            running.len() == 1 && parent_pid(running[0]) == Some(second.pid())
        },
    )
    .await;
    let settled_in = quiescent(
        &registry,
        &second,
        Duration::from_secs(2),
        Duration::from_secs(30),
    )
    .await;
    let (mismatches, requests) = disagreements(&registry, &second, &services, VERSIONS).await;
    println!(
        "crash: killed with {answered_before_kill} changes sent ({before_kill:?}; no answer: \
         interrupted by the kill; refused: sent after it); \
         orphaned HAProxy processes {orphans:?}; settled {settled_in:?} after the restart; \
         checker: {requests} requests, {} mismatches",
        mismatches.len()
    );
    assert!(
        mismatches.is_empty(),
        "seed {seed}: KV, /services and HAProxy disagree after the restart:\n{}",
        mismatches.join("\n")
    );
    let (status, body) = second.get_through_proxy("/steady/x", None).await;
    assert_eq!(
        (status, body.as_str()),
        (StatusCode::OK, "steady /steady/x")
    );

    drop(second);
    drop(first);
    kill_processes(&haproxy_processes(data_dir.path()));
}
