//! HAProxy's faults never cost another service a request: a port another program holds is
//! refused before any reload, a frozen HAProxy is answered 503 at once and replaced, a killed one
//! serves again at once with the last good configuration, a full disk changes nothing, and on
//! SIGTERM flow-proxy finishes the calls in flight and leaves HAProxy serving for the next one.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use reqwest::StatusCode;
use serde_json::Value;
use tempfile::TempDir;
use tokio::time::Instant;

use crate::fleet::{eventually, live_group_members, ProxyOptions, ProxyProcess, SharedRegistry};
use crate::helpers::{spawn_backend, TestProxy};
use crate::proxy_client::http_client;

/// A new service that needs a reload (a backend setting of its own: a default plain service
/// would go live in a pool backend without one); these tests are about the reload path.
const NEEDS_RELOAD: &str = "serviceName=late&servicePath=/late&timeoutServer=45";

/// How long a refused change may take to be answered (the supervisor's probe of a frozen HAProxy
/// takes up to two 1 s timeouts).
const ANSWER_BOUND: Duration = Duration::from_secs(5);

/// How long the supervisor may take to replace a dead or hung HAProxy (three 1 s probes, a
/// SIGKILL and a start).
const REPLACE_BOUND: Duration = Duration::from_secs(10);

/// Requests `GET <path>` through HAProxy on 127.0.0.1:`port`, a new connection each, until
/// `stop` (at most 100,000); returns, in order, whether each one succeeded.
fn traffic(port: u16, path: &str, stop: Arc<AtomicBool>) -> tokio::task::JoinHandle<Vec<bool>> {
    let url = format!("http://127.0.0.1:{port}{path}");
    tokio::spawn(async move {
        let client = reqwest::Client::builder()
            .pool_max_idle_per_host(0)
            .timeout(Duration::from_secs(5))
            .build()
            .expect("client");
        let mut outcomes = Vec::new();
        while outcomes.len() < 100_000 && !stop.load(Ordering::Relaxed) {
            let ok = matches!(client.get(&url).send().await, Ok(response) if response.status() == StatusCode::OK);
            outcomes.push(ok);
        }
        outcomes
    })
}

fn message(body: &Value) -> &str {
    body["Message"].as_str().unwrap_or_default()
}

/// The names of the routed services, as `/services` lists them.
async fn routed_names(proxy: &TestProxy) -> Vec<String> {
    proxy
        .services()
        .await
        .as_array()
        .expect("/services is a list")
        .iter()
        .filter_map(|spec| spec["ServiceName"].as_str().map(str::to_string))
        .collect()
}

/// The `X-Consul-Index` of flow-proxy's KV prefix: it moves with every write under it, also
/// with a write that was later undone.
async fn kv_index(proxy: &TestProxy) -> String {
    let response = proxy
        .http()
        .get(format!(
            "http://{}/v1/kv/flow-proxy/?recurse",
            proxy.registry_address()
        ))
        .send()
        .await
        .expect("registry answers");
    response
        .headers()
        .get("X-Consul-Index")
        .and_then(|index| index.to_str().ok())
        .expect("an X-Consul-Index")
        .to_string()
}

/// A proxy routing `/steady` to a backend that answers `steady`.
async fn proxy_with_steady_route() -> (TestProxy, crate::helpers::Backend) {
    let proxy = TestProxy::spawn().await;
    let backend = spawn_backend("steady").await;
    proxy
        .register_instance("steady", "steady.1", backend.port)
        .await;
    proxy
        .reconfigure_ok("serviceName=steady&servicePath=/steady")
        .await;
    (proxy, backend)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_src_port_another_program_holds_is_refused_before_any_reload() {
    let (proxy, _backend) = proxy_with_steady_route().await;
    let held = std::net::TcpListener::bind("127.0.0.1:0").expect("hold a port");
    let port = held.local_addr().expect("held address").port();
    let before = proxy.snapshot().await;
    let kv_before = kv_index(&proxy).await;

    let stop = Arc::new(AtomicBool::new(false));
    let client = traffic(proxy.http_port, "/steady", stop.clone());
    let mut answers = Vec::new();
    // The ten bad calls in a row, TCP and HTTP.
    let queries = [
        format!("serviceName=grabber&reqMode=tcp&srcPort={port}"),
        format!("serviceName=grabber&servicePath=/grab&srcPort={port}"),
    ];
    for query in queries.iter().cycle().take(10) {
        let started = Instant::now();
        let (status, body) = proxy.reconfigure(query).await;
        answers.push((query, status, body, started.elapsed()));
    }
    stop.store(true, Ordering::Relaxed);
    let outcomes = client.await.expect("traffic task");

    for (query, status, body, took) in &answers {
        assert_eq!(*status, StatusCode::CONFLICT, "reconfigure?{query}: {body}");
        let text = message(body);
        assert!(
            text.contains(&format!("port {port}")) && text.contains("already in use"),
            "the answer names the port: {text}"
        );
        assert!(
            text.contains(&format!("(pid {})", std::process::id())),
            "the answer names the program holding the port (this test): {text}"
        );
        assert!(*took < ANSWER_BOUND, "answered after {took:?}");
    }
    let failed = outcomes.iter().filter(|ok| !**ok).count();
    assert!(
        outcomes.len() > 10,
        "traffic ran during the refused changes"
    );
    assert_eq!(
        failed,
        0,
        "{failed} of {} requests to another route failed during the refused changes",
        outcomes.len()
    );
    proxy.assert_unchanged_since(&before).await;
    assert_eq!(routed_names(&proxy).await, ["steady"]);
    assert_eq!(proxy.stored_spec("grabber").await, None);
    assert_eq!(kv_index(&proxy).await, kv_before, "KV was not written");

    // Once the other program lets the port go, the same change works.
    drop(held);
    proxy
        .reconfigure_ok(&format!("serviceName=grabber&reqMode=tcp&srcPort={port}"))
        .await;
    assert!(proxy
        .config()
        .await
        .contains(&format!("bind 127.0.0.1:{port}")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_src_port_a_removed_service_gave_back_can_be_taken_at_once() {
    let (proxy, _backend) = proxy_with_steady_route().await;
    let port = crate::helpers::free_port();
    // The HAProxy process a reload replaces may still hold the port for a moment: that is no
    // other program, and HAProxy itself can bind it (SO_REUSEPORT).
    for round in 0..5 {
        let query = format!("serviceName=db{round}&reqMode=tcp&srcPort={port}");
        proxy.reconfigure_ok(&query).await;
        let (status, body) = proxy.remove(&format!("serviceName=db{round}")).await;
        assert_eq!(status, StatusCode::OK, "remove db{round}: {body}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_haproxy_is_answered_503_and_replaced() {
    let (proxy, _backend) = proxy_with_steady_route().await;
    let frozen = proxy.haproxy_pid().await.expect("HAProxy answers");
    let config_before = proxy.config().await;
    let kv_before = kv_index(&proxy).await;
    signal(frozen, libc::SIGSTOP);

    let started = Instant::now();
    let (status, body) = proxy.reconfigure(NEEDS_RELOAD).await;
    let took = started.elapsed();
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert!(
        message(&body).contains("HAProxy does not answer"),
        "the answer says HAProxy does not answer: {}",
        message(&body)
    );
    assert!(took < ANSWER_BOUND, "answered after {took:?}");
    assert_eq!(
        proxy.stored_spec("late").await,
        None,
        "nothing stored in KV"
    );
    assert_eq!(kv_index(&proxy).await, kv_before, "KV was not written");
    assert_eq!(routed_names(&proxy).await, ["steady"]);

    eventually(
        "the supervisor replaces the frozen HAProxy",
        REPLACE_BOUND,
        || async { matches!(proxy.haproxy_pid().await, Some(pid) if pid != frozen) },
    )
    .await;
    eventually("the frozen process is gone", REPLACE_BOUND, || async {
        !std::path::Path::new(&format!("/proc/{frozen}")).exists()
    })
    .await;
    assert_eq!(proxy.config().await, config_before);
    assert_eq!(
        proxy.names_answering("/steady", None, 3).await,
        ["steady"; 3]
    );

    proxy.reconfigure_ok(NEEDS_RELOAD).await;
    let (status, _) = proxy.get_through_proxy("/late", None).await;
    assert_eq!(
        status,
        StatusCode::SERVICE_UNAVAILABLE,
        "late has no instance yet: HAProxy's 503 page"
    );
    assert!(proxy.stored_spec("late").await.is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_haproxy_serves_again_at_once_with_the_last_good_config() {
    let (proxy, _backend) = proxy_with_steady_route().await;
    let config_before = proxy.config().await;
    let killed = proxy.haproxy_pid().await.expect("HAProxy answers");

    let stop = Arc::new(AtomicBool::new(false));
    let client = traffic(proxy.http_port, "/steady", stop.clone());
    // Some traffic before the kill, so the count below starts from a serving HAProxy.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let killed_at = Instant::now();
    signal(killed, libc::SIGKILL);
    let back_after = eventually("a new HAProxy serves", REPLACE_BOUND, || async {
        matches!(proxy.haproxy_pid().await, Some(pid) if pid != killed)
    })
    .await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    stop.store(true, Ordering::Relaxed);
    let outcomes = client.await.expect("traffic task");

    let refused = outcomes.iter().filter(|ok| !**ok).count();
    assert!(
        outcomes.last() == Some(&true),
        "the route serves again after the kill ({refused} of {} requests refused)",
        outcomes.len()
    );
    assert!(
        back_after < Duration::from_secs(2),
        "serving again {back_after:?} after the kill (measured from {killed_at:?}); {refused} of \
         {} requests refused",
        outcomes.len()
    );
    assert_eq!(proxy.config().await, config_before, "the last good config");
    assert_eq!(
        proxy.names_answering("/steady", None, 3).await,
        ["steady"; 3]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_is_answered_500_and_changes_nothing() {
    let (proxy, _backend) = proxy_with_steady_route().await;
    let before = proxy.snapshot().await;
    let kv_before = kv_index(&proxy).await;
    let candidate = proxy.data_dir().join("haproxy.cfg.candidate");
    let _ = std::fs::remove_file(&candidate);
    // Every write to /dev/full fails with ENOSPC, as on a full disk.
    std::os::unix::fs::symlink("/dev/full", &candidate).expect("candidate → /dev/full");

    let (status, body) = proxy.reconfigure(NEEDS_RELOAD).await;
    assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR, "{body}");
    assert!(
        message(&body).contains("No space left on device")
            && message(&body).contains("haproxy.cfg.candidate"),
        "the answer names the reason and the file: {}",
        message(&body)
    );
    proxy.assert_unchanged_since(&before).await;
    assert_eq!(
        proxy.stored_spec("late").await,
        None,
        "nothing stored in KV"
    );
    assert_eq!(kv_index(&proxy).await, kv_before, "KV was not written");
    assert_eq!(routed_names(&proxy).await, ["steady"]);
    assert_eq!(
        proxy.names_answering("/steady", None, 2).await,
        ["steady"; 2]
    );

    // The disk recovers: the next change works.
    std::fs::remove_file(&candidate).expect("remove the fault");
    proxy.reconfigure_ok(NEEDS_RELOAD).await;
    assert!(proxy.stored_spec("late").await.is_some());
    assert_eq!(routed_names(&proxy).await, ["late", "steady"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_sigterm_the_call_in_flight_finishes_and_haproxy_serves_until_the_next_flow_proxy() {
    let registry = SharedRegistry::start().await;
    let backend = spawn_backend("steady").await;
    registry
        .register_instance("steady", "steady.1", backend.port)
        .await;
    let data_dir = TempDir::new().expect("data directory");
    let mut first = ProxyProcess::start_with(
        &registry.address(),
        ProxyOptions {
            data_dir: Some(data_dir.path().to_path_buf()),
            omit_stop_haproxy_flag: true,
            ..ProxyOptions::default()
        },
    )
    .await;
    first
        .reconfigure_ok("serviceName=steady&servicePath=/steady")
        .await;

    // A reconfigure in flight: its candidate is being validated when SIGTERM arrives.
    let call =
        tokio::spawn(
            http_client()
                .get(first.api(
                    "/v1/docker-flow-proxy/reconfigure?serviceName=second&servicePath=/second&timeoutServer=45",
                ))
                .send(),
        );
    let candidate = data_dir.path().join("haproxy.cfg.candidate");
    let deadline = Instant::now() + ANSWER_BOUND;
    while !std::fs::read_to_string(&candidate).is_ok_and(|text| text.contains("second")) {
        assert!(
            Instant::now() < deadline,
            "the reconfigure reached validation"
        );
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    assert!(
        !call.is_finished(),
        "SIGTERM comes while the call is in flight"
    );
    let status = first.stop_leaving_haproxy().await;
    assert!(status.success(), "flow-proxy exits cleanly: {status}");
    let answer = call
        .await
        .expect("call task")
        .expect("the call in flight is answered");
    assert_eq!(answer.status(), StatusCode::OK);

    // flow-proxy is down; its HAProxy serves both routes.
    let left_running = first.haproxy_pid().await.expect("HAProxy still answers");
    assert_eq!(
        first.names_answering("/steady", None, 3).await,
        ["steady"; 3]
    );
    let (status, _) = first.get_through_proxy("/second", None).await;
    assert_eq!(
        status,
        StatusCode::SERVICE_UNAVAILABLE,
        "/second is routed (no instance: 503 page)"
    );

    // The next flow-proxy on the same data directory and port takes it over.
    let mut second = ProxyProcess::start_with(
        &registry.address(),
        ProxyOptions {
            data_dir: Some(data_dir.path().to_path_buf()),
            http_port: Some(first.http_port),
            ..ProxyOptions::default()
        },
    )
    .await;
    let first_group = first.pid();
    eventually(
        "the HAProxy left running has handed over and exited",
        REPLACE_BOUND,
        || async { live_group_members(first_group).is_empty() },
    )
    .await;
    let haproxies: Vec<(u32, String)> = live_group_members(second.pid())
        .into_iter()
        .filter(|(_, name)| name == "haproxy")
        .collect();
    assert_eq!(haproxies.len(), 1, "exactly one HAProxy: {haproxies:?}");
    let serving = second.haproxy_pid().await.expect("HAProxy answers");
    assert_ne!(
        serving, left_running,
        "the new flow-proxy runs its own HAProxy"
    );
    assert_eq!(
        second.names_answering("/steady", None, 3).await,
        ["steady"; 3]
    );
    second
        .reconfigure_ok("serviceName=third&servicePath=/third")
        .await;
    second.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_stop_haproxy_on_exit_haproxy_goes_with_flow_proxy() {
    let registry = SharedRegistry::start().await;
    // The flag given as its environment variable (the harness gives the flag itself otherwise).
    let mut proxy = ProxyProcess::start_with(
        &registry.address(),
        ProxyOptions {
            omit_stop_haproxy_flag: true,
            env: vec![("STOP_HAPROXY_ON_EXIT".into(), "true".into())],
            ..ProxyOptions::default()
        },
    )
    .await;
    proxy
        .reconfigure_ok("serviceName=steady&servicePath=/steady")
        .await;
    let haproxy = proxy.haproxy_pid().await.expect("HAProxy answers");
    // `stop` also fails when anything flow-proxy started outlives it.
    assert!(proxy.stop().await.success());
    assert!(
        !std::path::Path::new(&format!("/proc/{haproxy}")).exists(),
        "HAProxy (pid {haproxy}) is gone"
    );
    assert_eq!(proxy.haproxy_pid().await, None);
}

fn signal(pid: u32, signal: libc::c_int) {
    let pid = libc::pid_t::try_from(pid).expect("a pid fits pid_t");
    // SAFETY: kill(2) on the HAProxy process this test's flow-proxy started.
    unsafe {
        libc::kill(pid, signal);
    }
}
