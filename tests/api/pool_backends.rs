//! A new plain service without a reload: the file carries empty pool backends (`pool-1`, …);
//! a new service whose backend is the default one and whose rule joins an existing map takes
//! one (its instances go into the pool backend's server slots, its map entries name it), all
//! over HAProxy's Runtime API. When the pool runs low, a reload in the background gives every
//! service its own backend back. Reloads are counted by the PID of the process serving on the
//! stats socket.

use std::time::Duration;

use reqwest::StatusCode;

use crate::fleet::eventually;
use crate::helpers::{spawn_backend, Backend, TestProxy};
use crate::metrics::{scrape, value};
use crate::status_page::status_page_text;

/// The PID of the HAProxy process serving now.
async fn serving_pid(proxy: &TestProxy) -> u32 {
    proxy
        .haproxy_pid()
        .await
        .expect("HAProxy answers on its stats socket")
}

/// Who answers `path` through HAProxy, or the status when it is not 200.
pub async fn answer(proxy: &TestProxy, path: &str) -> String {
    let (status, body) = proxy.get_through_proxy(path, None).await;
    if status == StatusCode::OK {
        body.split(' ').next().unwrap_or_default().to_string()
    } else {
        status.as_str().to_string()
    }
}

/// Starts a backend answering with `name` and registers it as the one instance of `name`.
async fn instance_of(proxy: &TestProxy, name: &str) -> Backend {
    let backend = spawn_backend(name).await;
    proxy
        .register_instance(name, &format!("{name}.1"), backend.port)
        .await;
    backend
}

/// A proxy that routes one plain path-only service (`seed` on `/seed`), so that the path map
/// exists and a new path-only rule only adds a map entry.
async fn proxy_with_a_path_map() -> (TestProxy, Backend) {
    let proxy = TestProxy::spawn().await;
    let seed = instance_of(&proxy, "seed").await;
    proxy
        .reconfigure_ok("serviceName=seed&servicePath=/seed")
        .await;
    assert_eq!(answer(&proxy, "/seed").await, "seed");
    (proxy, seed)
}

/// The map file of the main frontend's path-only rules (once the queued live writes are done:
/// `/config` answers after them).
async fn path_map(proxy: &TestProxy) -> String {
    proxy.config().await;
    let maps = proxy.data_dir.path().join("maps");
    let mut texts = Vec::new();
    for entry in std::fs::read_dir(&maps).expect("the maps directory") {
        let path = entry.expect("a map file").path();
        texts.push(std::fs::read_to_string(&path).expect("a readable map file"));
    }
    texts
        .into_iter()
        .find(|text| text.starts_with('/'))
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_plain_service_is_served_right_after_its_answer_without_a_reload() {
    let (proxy, _seed) = proxy_with_a_path_map().await;
    let pid = serving_pid(&proxy).await;
    let _fresh = instance_of(&proxy, "fresh").await;

    proxy
        .reconfigure_ok("serviceName=fresh&servicePath=/fresh")
        .await;
    assert_eq!(answer(&proxy, "/fresh/x").await, "fresh", "served at once");
    assert_eq!(serving_pid(&proxy).await, pid, "no reload");
    assert_eq!(answer(&proxy, "/seed").await, "seed");
    assert!(
        path_map(&proxy).await.contains("/fresh pool-1\n"),
        "the map entry names the pool backend: {}",
        path_map(&proxy).await
    );
    // The services list and the stored spec show the service, not the pool.
    let services = proxy.services().await.to_string();
    assert!(services.contains("\"fresh\""), "{services}");
    assert!(proxy.stored_spec("fresh").await.is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_pool_is_refilled_in_the_background_when_it_runs_low() {
    let (proxy, _seed) = proxy_with_a_path_map().await;
    let first_pid = serving_pid(&proxy).await;
    let mut backends = Vec::new();
    // 8 pool backends, refilled below 4 free: the first four take one each without a reload.
    for n in 1..=4 {
        let name = format!("new{n}");
        backends.push(instance_of(&proxy, &name).await);
        proxy
            .reconfigure_ok(&format!("serviceName={name}&servicePath=/{name}"))
            .await;
        assert_eq!(answer(&proxy, &format!("/{name}")).await, name);
        assert_eq!(serving_pid(&proxy).await, first_pid, "no reload for {name}");
    }
    // The fifth leaves 3 free: it is served, then the pool is refilled by a reload nobody waits for.
    backends.push(instance_of(&proxy, "new5").await);
    proxy
        .reconfigure_ok("serviceName=new5&servicePath=/new5")
        .await;
    assert_eq!(answer(&proxy, "/new5").await, "new5");
    eventually(
        "the refill reload gives every service its own backend",
        Duration::from_secs(10),
        || async {
            let config = proxy.config().await;
            (1..=5).all(|n| config.contains(&format!("backend new{n}-be0")))
        },
    )
    .await;
    let refilled_pid = serving_pid(&proxy).await;
    assert_ne!(refilled_pid, first_pid, "the refill is a reload");
    for n in 1..=5 {
        assert_eq!(answer(&proxy, &format!("/new{n}")).await, format!("new{n}"));
    }
    assert!(
        !path_map(&proxy).await.contains("pool-"),
        "{}",
        path_map(&proxy).await
    );

    // The pool is full again: the next new service goes live without reload.
    backends.push(instance_of(&proxy, "new6").await);
    proxy
        .reconfigure_ok("serviceName=new6&servicePath=/new6")
        .await;
    assert_eq!(answer(&proxy, "/new6").await, "new6");
    assert_eq!(
        serving_pid(&proxy).await,
        refilled_pid,
        "no reload for new6"
    );
}

/// Routes `name` on `/name` (its instance registered first) and checks that it answers; the
/// PID of the HAProxy serving right after the answer.
async fn route_new(proxy: &TestProxy, name: &str, backends: &mut Vec<Backend>) -> u32 {
    backends.push(instance_of(proxy, name).await);
    proxy
        .reconfigure_ok(&format!("serviceName={name}&servicePath=/{name}"))
        .await;
    assert_eq!(answer(proxy, &format!("/{name}")).await, name);
    serving_pid(proxy).await
}

/// Waits until the background refill has given `name` its own backend; the PID serving then.
async fn refilled_after(proxy: &TestProxy, name: &str) -> u32 {
    eventually(
        &format!("the refill after {name} gives it its own backend"),
        Duration::from_secs(10),
        || async {
            proxy
                .config()
                .await
                .contains(&format!("backend {name}-be0"))
        },
    )
    .await;
    serving_pid(proxy).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wave_of_new_services_grows_the_pool_so_refills_get_rarer() {
    let (proxy, _seed) = proxy_with_a_path_map().await;
    let mut backends = Vec::new();
    // 8 pool backends, refilled below 4 free: the fifth new service queues the first refill,
    // which makes 8 again (nothing came before it).
    for n in 1..=5 {
        route_new(&proxy, &format!("w{n}"), &mut backends).await;
    }
    let first_refill = refilled_after(&proxy, "w5").await;
    assert!(proxy.config().await.contains("backend pool-8\n"));
    // Five more within the minute: the second refill doubles the pool.
    for n in 6..=10 {
        route_new(&proxy, &format!("w{n}"), &mut backends).await;
    }
    let second_refill = refilled_after(&proxy, "w10").await;
    assert_ne!(second_refill, first_refill, "the refill is a reload");
    let config = proxy.config().await;
    assert!(
        config.contains("backend pool-16\n") && !config.contains("backend pool-17\n"),
        "16 pool backends after the second refill"
    );
    // So the next eight go live without a reload (the ninth would leave fewer than 8 free).
    for n in 11..=18 {
        let name = format!("w{n}");
        assert_eq!(
            route_new(&proxy, &name, &mut backends).await,
            second_refill,
            "no reload for {name}"
        );
    }
    for n in 1..=18 {
        assert_eq!(answer(&proxy, &format!("/w{n}")).await, format!("w{n}"));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_service_that_needs_new_config_text_reloads() {
    let (proxy, _seed) = proxy_with_a_path_map().await;
    let _tuned = instance_of(&proxy, "tuned").await;
    let _headed = instance_of(&proxy, "headed").await;
    for (query, path, why) in [
        (
            "serviceName=tuned&servicePath=/tuned&timeoutServer=45",
            "/tuned",
            "a backend setting of its own",
        ),
        (
            "serviceName=headed&servicePath=/headed&serviceHeader=X-Version:3",
            "/headed",
            "a rule the maps cannot express",
        ),
    ] {
        let pid = serving_pid(&proxy).await;
        proxy.reconfigure_ok(query).await;
        assert_ne!(serving_pid(&proxy).await, pid, "{why}: a reload");
        let name = query
            .trim_start_matches("serviceName=")
            .split('&')
            .next()
            .unwrap_or_default();
        let config = proxy.config().await;
        assert!(
            config.contains(&format!("backend {name}-be0")),
            "{why}: its own backend\n{config}"
        );
        if name == "tuned" {
            assert_eq!(answer(&proxy, path).await, name);
        }
    }
    let headed = |version: &'static str| {
        proxy
            .http()
            .get(format!(
                "http://127.0.0.1:{}/headed",
                proxy.settings().http_port
            ))
            .header("X-Version", version)
            .send()
    };
    let response = headed("3").await.expect("HAProxy answers");
    assert_eq!(response.status(), StatusCode::OK);
    let body = response.text().await.expect("body");
    assert!(body.starts_with("headed"), "{body}");
    let other = headed("4").await.expect("HAProxy answers");
    assert_eq!(
        other.status(),
        StatusCode::SERVICE_UNAVAILABLE,
        "no rule matches"
    );
}

/// A proxy serving `fresh` from a pool backend (no reload since `seed`).
async fn fresh_on_a_pool_backend() -> (TestProxy, Vec<Backend>) {
    let (proxy, seed) = proxy_with_a_path_map().await;
    let pid = serving_pid(&proxy).await;
    let fresh = instance_of(&proxy, "fresh").await;
    proxy
        .reconfigure_ok("serviceName=fresh&servicePath=/fresh")
        .await;
    assert_eq!(answer(&proxy, "/fresh").await, "fresh");
    assert_eq!(serving_pid(&proxy).await, pid, "no reload");
    (proxy, vec![seed, fresh])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pool_service_stays_after_a_forced_reload() {
    let (proxy, _backends) = fresh_on_a_pool_backend().await;
    let pid = serving_pid(&proxy).await;
    let (status, body) = proxy.api_get("/v1/docker-flow-proxy/reload").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_ne!(serving_pid(&proxy).await, pid, "/reload reloads");
    assert_eq!(answer(&proxy, "/fresh").await, "fresh");
    assert!(proxy.config().await.contains("backend fresh-be0"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pool_service_stays_when_haproxy_is_replaced() {
    let (proxy, _backends) = fresh_on_a_pool_backend().await;
    let killed = serving_pid(&proxy).await;
    // SAFETY: kill(2) on the HAProxy child this test's flow-proxy started.
    unsafe {
        libc::kill(killed as libc::pid_t, libc::SIGKILL);
    }
    eventually("a new HAProxy serves", Duration::from_secs(10), || async {
        proxy.haproxy_pid().await.is_some_and(|pid| pid != killed)
    })
    .await;
    assert_eq!(answer(&proxy, "/fresh").await, "fresh");
    assert_eq!(answer(&proxy, "/seed").await, "seed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pool_service_stays_after_flow_proxy_restarts() {
    let (mut proxy, _backends) = fresh_on_a_pool_backend().await;
    proxy.stop().await;
    proxy.start_again().await;
    assert_eq!(answer(&proxy, "/fresh").await, "fresh");
    assert_eq!(answer(&proxy, "/seed").await, "seed");
    // The restart rendered the stored specs: the service has its own backend again.
    assert!(proxy.config().await.contains("backend fresh-be0"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_status_page_shows_the_health_of_a_pool_service_instance() {
    let (proxy, backends) = fresh_on_a_pool_backend().await;
    let up = format!("127.0.0.1:{} UP", backends[1].port);
    eventually(
        "the status page shows fresh's instance UP",
        Duration::from_secs(10),
        || async { status_page_text(&proxy).await.contains(&up) },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_label_a_pool_backend_with_its_service() {
    let (proxy, _backends) = fresh_on_a_pool_backend().await;
    for _ in 0..3 {
        assert_eq!(answer(&proxy, "/fresh").await, "fresh");
    }
    let text = scrape(&proxy).await;
    assert_eq!(
        value(
            &text,
            "flow_proxy_haproxy_backend_sessions_total",
            &[r#"service="fresh""#]
        ),
        4.0,
        "the three requests and the one of the setup"
    );
    assert!(
        !text.contains(r#"service="pool-1""#),
        "a pool backend is labelled with its service: {text}"
    );
}
