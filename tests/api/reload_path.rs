//! A change is parsed once, by the HAProxy process that is to serve it: the new process starts
//! on the candidate, KV is written once it serves, and only then is the candidate the live file.
//! What that order could break: a refused candidate must leave the serving process, the live
//! file and KV as they were and answer HAProxy's own line; a KV write that fails after the new
//! process started (here: check-and-set races lost) must put the previous configuration back
//! into HAProxy, and one that fails for a new service that would go live over the Runtime API
//! must leave HAProxy as it was, without a reload; and the old processes of a burst of reloads must end (and be reaped) once their
//! connections finish. (A Consul that is down or has no leader is found out by a KV read before
//! HAProxy is touched: `outages.rs` pins that such a change leaves the serving PID as it was.)
//!
//! `cargo test --test api reload_path:: -- --nocapture` prints how long a reconfigure that
//! reloads takes (`RELOAD_PATH_SERVICES=1000` routes that many services first).

use std::path::Path;
use std::time::{Duration, Instant};

use futures::StreamExt;
use reqwest::StatusCode;
use tokio::sync::mpsc;

use crate::fleet::{eventually, haproxy_processes, ProxyProcess, SharedRegistry};
use crate::front::RegistryFront;
use crate::helpers::{proxy_routing_demo, spawn_backend, Backend, TestProxy};
use crate::metrics::{scrape, value};
use crate::supervision::zombie_children;

/// How long old HAProxy processes may take to end and be reaped once their connections finished.
const OLD_PROCESSES_BOUND: Duration = Duration::from_secs(10);

/// The backends the HAProxy serving from `data_dir` runs now (`show backend` on its stats
/// socket): what the process holds, not what the file says.
async fn served_backends(data_dir: &Path) -> Vec<String> {
    let socket = data_dir
        .canonicalize()
        .expect("the data directory exists")
        .join("haproxy.sock");
    let answer = flow_proxy::haproxy::runtime_command(&socket, "show backend")
        .await
        .expect("HAProxy answers `show backend`");
    answer
        .lines()
        .filter(|line| !line.starts_with('#') && !line.trim().is_empty())
        .map(str::to_string)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_candidate_changes_nothing_and_answers_haproxys_own_line() {
    let (proxy, _backend) = proxy_routing_demo().await;
    let before = proxy.snapshot().await;
    let serving = haproxy_processes(proxy.data_dir());
    assert_eq!(serving.len(), 1, "one HAProxy serves: {serving:?}");

    // A regular expression HAProxy's engine does not compile: only HAProxy can refuse it.
    let (status, answer) = proxy
        .reconfigure("serviceName=go-demo&servicePath=/demo[&pathType=path_reg")
        .await;

    assert_eq!(status, StatusCode::BAD_REQUEST, "{answer}");
    let message = answer["Message"].as_str().unwrap_or_default();
    assert!(
        message.contains("[ALERT]")
            && message.contains("parsing [")
            && message.contains("haproxy.cfg.candidate:"),
        "HAProxy's own line, naming the line it refused: {message}"
    );
    proxy.assert_unchanged_since(&before).await;
    assert_eq!(
        haproxy_processes(proxy.data_dir()),
        serving,
        "the process started on the refused candidate is gone; the serving one never stopped"
    );
    let stored = proxy
        .stored_spec("go-demo")
        .await
        .expect("go-demo is stored");
    assert_eq!(
        stored["PathType"], "path_beg",
        "KV keeps the old spec: {stored}"
    );
    assert_eq!(proxy.names_answering("/demo/x", None, 2).await, ["demo"; 2]);

    // The next good change goes through the same candidate file and is served.
    proxy
        .reconfigure_ok("serviceName=go-demo&servicePath=/demo,/other")
        .await;
    assert_eq!(proxy.names_answering("/other", None, 1).await, ["demo"]);
}

/// A proxy whose registry is reached through a [`RegistryFront`] (which can lose its
/// check-and-set writes to a rival), routing `web` on `/web`, with `api` registered but not
/// routed.
async fn web_routed_behind_a_front() -> (SharedRegistry, RegistryFront, ProxyProcess, [Backend; 2])
{
    let registry = SharedRegistry::start().await;
    let front = RegistryFront::start(&registry.address()).await;
    let proxy = ProxyProcess::start(&front.address(), &[]).await;
    let web = spawn_backend("web").await;
    let api = spawn_backend("api").await;
    registry.register_instance("web", "web.1", web.port).await;
    registry.register_instance("api", "api.1", api.port).await;
    proxy
        .reconfigure_ok("serviceName=web&servicePath=/web")
        .await;
    (registry, front, proxy, [web, api])
}

/// Once the rival stops winning, `api` is stored and served.
async fn api_is_served_once_writes_win(front: &RegistryFront, proxy: &ProxyProcess) {
    front.rival_wins_next(0, "");
    proxy
        .reconfigure_ok("serviceName=api&servicePath=/api")
        .await;
    assert_eq!(
        proxy.get_through_proxy("/api", None).await,
        (StatusCode::OK, "api /api".to_string())
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kv_write_that_fails_after_the_new_process_served_puts_the_previous_config_back() {
    let (_registry, front, proxy, _backends) = web_routed_behind_a_front().await;
    let config_before = proxy.config().await;
    let backends_before = served_backends(proxy.data_dir()).await;
    let pid_before = proxy.haproxy_pid().await.expect("HAProxy answers");
    let unrouted_before = proxy.get_through_proxy("/api", None).await;

    // Consul answers every read, but each check-and-set write loses to a rival (whose document
    // is no spec, so the proxy routes nothing from it): the new process has started on the
    // candidate by the time the change turns out not to be storable.
    front.rival_wins_next(usize::MAX, "not a spec");
    // A backend setting of its own, so it needs a reload (a default plain service would go
    // live in a pool backend without one).
    let (status, body) = proxy
        .reconfigure("serviceName=api&servicePath=/api&timeoutServer=45")
        .await;

    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    assert_ne!(
        proxy.haproxy_pid().await,
        Some(pid_before),
        "HAProxy was reloaded (onto the candidate, then back)"
    );
    assert_eq!(
        served_backends(proxy.data_dir()).await,
        backends_before,
        "the serving process runs the previous configuration"
    );
    assert_eq!(proxy.config().await, config_before, "haproxy.cfg unchanged");
    assert_eq!(
        proxy.get_through_proxy("/web", None).await,
        (StatusCode::OK, "web /web".to_string()),
        "routes are served as before"
    );
    assert_eq!(
        proxy.get_through_proxy("/api", None).await,
        unrouted_before,
        "the refused service is not routed"
    );
    eventually(
        "only the process of the previous configuration is left",
        OLD_PROCESSES_BOUND,
        || async { haproxy_processes(proxy.data_dir()).len() == 1 },
    )
    .await;

    api_is_served_once_writes_win(&front, &proxy).await;
}

/// The entries (`key value`) of map file `file` as the HAProxy serving from `data_dir` holds
/// them (`show map`), not as the file says.
async fn served_map(data_dir: &Path, file: &str) -> Vec<String> {
    let socket = data_dir
        .canonicalize()
        .expect("the data directory exists")
        .join("haproxy.sock");
    let answer = flow_proxy::haproxy::runtime_command(&socket, &format!("show map {file}"))
        .await
        .expect("HAProxy answers `show map`");
    let mut entries: Vec<String> = answer
        .lines()
        .filter_map(|line| line.split_once(' ').map(|(_, entry)| entry.to_string()))
        .collect();
    entries.sort();
    entries
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kv_write_that_fails_for_a_service_placed_at_runtime_leaves_haproxy_as_it_was() {
    let (_registry, front, proxy, _backends) = web_routed_behind_a_front().await;
    let config_before = proxy.config().await;
    let map_before = served_map(proxy.data_dir(), "maps/http-1.map").await;
    assert_eq!(map_before, ["/web web-be0"], "the path map HAProxy holds");
    let pid_before = proxy.haproxy_pid().await.expect("HAProxy answers");
    let unrouted_before = proxy.get_through_proxy("/api", None).await;

    // Every check-and-set write loses to a rival. A default plain service would go live in a
    // pool backend over the Runtime API once its spec is written.
    front.rival_wins_next(usize::MAX, "not a spec");
    let (status, body) = proxy.reconfigure("serviceName=api&servicePath=/api").await;

    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    assert_eq!(
        proxy.get_through_proxy("/api", None).await,
        unrouted_before,
        "the refused service is not routed"
    );
    assert_eq!(
        served_map(proxy.data_dir(), "maps/http-1.map").await,
        map_before,
        "no map entry added"
    );
    assert_eq!(proxy.haproxy_pid().await, Some(pid_before), "no reload");
    assert_eq!(proxy.config().await, config_before, "haproxy.cfg unchanged");
    assert_eq!(
        proxy.get_through_proxy("/web", None).await,
        (StatusCode::OK, "web /web".to_string()),
        "routes are served as before"
    );

    api_is_served_once_writes_win(&front, &proxy).await;
    assert_eq!(
        proxy.haproxy_pid().await,
        Some(pid_before),
        "still no reload"
    );
}

/// A backend whose `/slow` answers after `delay`, telling `arrived` when a request came in.
async fn spawn_slow_backend(delay: Duration) -> (u16, mpsc::UnboundedReceiver<()>) {
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", 0))
        .await
        .expect("bind the slow backend");
    let port = listener.local_addr().expect("its address").port();
    let (arrived, arrivals) = mpsc::unbounded_channel();
    let app = axum::Router::new().fallback(move || {
        let arrived = arrived.clone();
        async move {
            let _ = arrived.send(());
            tokio::time::sleep(delay).await;
            "slow answered"
        }
    });
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    (port, arrivals)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_burst_of_reloads_old_processes_end_once_their_connections_finish() {
    let proxy = TestProxy::spawn().await;
    let (slow_port, mut arrivals) = spawn_slow_backend(Duration::from_secs(3)).await;
    proxy.register_instance("slow", "slow.1", slow_port).await;
    proxy
        .reconfigure_ok("serviceName=slow&servicePath=/slow")
        .await;

    // A request in flight on the process that serves now.
    let url = format!("http://127.0.0.1:{}/slow", proxy.http_port);
    let in_flight = tokio::spawn(async move {
        let response = reqwest::get(url).await?;
        let status = response.status();
        Ok::<_, reqwest::Error>((status, response.text().await?))
    });
    tokio::time::timeout(Duration::from_secs(5), arrivals.recv())
        .await
        .expect("the slow request reaches its backend");

    // A burst of changes, sequential and concurrent, each one a reload.
    for round in 0..5 {
        proxy
            .reconfigure_ok(&format!("serviceName=seq{round}&servicePath=/seq{round}"))
            .await;
    }
    futures::stream::iter(0..10)
        .map(|round| {
            let proxy = &proxy;
            async move {
                proxy
                    .reconfigure_ok(&format!("serviceName=par{round}&servicePath=/par{round}"))
                    .await
            }
        })
        .buffer_unordered(10)
        .collect::<Vec<()>>()
        .await;
    let during = haproxy_processes(proxy.data_dir()).len();
    assert!(
        during >= 2,
        "the process holding the slow request still finishes it ({during} processes)"
    );
    assert_eq!(
        value(&scrape(&proxy).await, "flow_proxy_haproxy_processes", &[]),
        during as f64,
        "/metrics counts them all"
    );

    let (status, body) = in_flight
        .await
        .expect("the request task")
        .expect("the request in flight is answered, not cut");
    assert_eq!((status, body.as_str()), (StatusCode::OK, "slow answered"));
    eventually(
        "the old processes end once their connections finished",
        OLD_PROCESSES_BOUND,
        || async { haproxy_processes(proxy.data_dir()).len() == 1 },
    )
    .await;
    assert_eq!(
        value(&scrape(&proxy).await, "flow_proxy_haproxy_processes", &[]),
        1.0
    );
    assert!(
        zombie_children().is_empty(),
        "every old HAProxy was reaped: {:?}",
        zombie_children()
    );
}

/// Reconfigures `timed` to a new path `rounds` times, each a reload, asserting each new path is
/// served as soon as the call is answered; prints the call's p50 and extremes.
async fn reconfigure_and_time(proxy: &TestProxy, label: &str, rounds: usize) {
    let mut took = Vec::with_capacity(rounds);
    for round in 0..rounds {
        let path = format!("/timed{round}");
        let started = Instant::now();
        proxy
            .reconfigure_ok(&format!("serviceName=timed&servicePath={path}"))
            .await;
        took.push(started.elapsed());
        assert_eq!(
            proxy.get_through_proxy(&path, None).await,
            (StatusCode::OK, format!("timed {path}")),
            "served once answered"
        );
    }
    took.sort();
    println!(
        "reconfigure that reloads, {label}: p50 {:?}, fastest {:?}, slowest {:?} ({rounds} calls)",
        took[rounds / 2],
        took[0],
        took[rounds - 1]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_change_that_reloads_is_served_once_answered() {
    let proxy = TestProxy::spawn().await;
    let backend = spawn_backend("timed").await;
    proxy
        .register_instance("timed", "timed.1", backend.port)
        .await;
    reconfigure_and_time(&proxy, "1 service", 21).await;

    let services: usize = std::env::var("RELOAD_PATH_SERVICES")
        .ok()
        .and_then(|count| count.parse().ok())
        .unwrap_or(0);
    if services > 0 {
        futures::stream::iter(0..services)
            .map(|index| {
                let proxy = &proxy;
                async move {
                    proxy
                        .reconfigure_ok(&format!("serviceName=svc{index}&servicePath=/svc{index}"))
                        .await
                }
            })
            .buffer_unordered(32)
            .collect::<Vec<()>>()
            .await;
        reconfigure_and_time(&proxy, &format!("{} services", services + 1), 11).await;
    }
}
