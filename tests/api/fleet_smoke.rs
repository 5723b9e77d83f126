//! The fleet harness works: real flow-proxy processes share one registry, checks change what is
//! healthy, stopped proxies leave nothing behind, and `eventually` measures honestly. (Outages of
//! the registry are the subject of `outages.rs`.)

use std::time::Duration;

use reqwest::StatusCode;

use crate::fleet::{eventually, live_group_members, ProxyProcess, SharedRegistry};
use crate::helpers::spawn_backend;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_proxies_share_one_registry_and_a_route_set_on_one_is_stored_there() {
    let registry = SharedRegistry::start().await;
    let address = registry.address();
    let (mut a, mut b) = tokio::join!(
        ProxyProcess::start(&address, &[]),
        ProxyProcess::start(&address, &[]),
    );
    for proxy in [&a, &b] {
        let (status, body) = proxy.api_get("/v1/docker-flow-proxy/ping").await;
        assert_eq!(status, StatusCode::OK, "ping: {body}");
    }
    assert_ne!(a.http_port, b.http_port, "each proxy has its own HAProxy");

    let web = spawn_backend("web").await;
    registry.register_instance("web", "web.1", web.port).await;
    a.reconfigure_ok("serviceName=web&servicePath=/web").await;

    assert_eq!(
        a.get_through_proxy("/web", None).await,
        (StatusCode::OK, "web /web".to_string())
    );
    let spec = registry
        .stored_spec("web")
        .await
        .expect("the spec is stored in the shared registry");
    assert_eq!(spec["ServiceName"], "web");
    assert_eq!(spec["ServiceDest"][0]["ServicePath"][0], "/web");
    assert_eq!(
        registry.kv_keys("flow-proxy/").await,
        ["flow-proxy/services/web"]
    );
    let config = a.config().await;
    // A plain path is routed through a map file next to haproxy.cfg.
    assert!(
        config.contains("map_beg(maps/http-1.map)"),
        "A's haproxy.cfg routes through its map:\n{config}"
    );
    assert_eq!(
        a.live_file("maps/http-1.map").await,
        "/web web-be0\n",
        "A's map routes /web"
    );
    assert_eq!(
        a.live_file("haproxy.cfg").await,
        config,
        "/config shows the live file in A's data directory"
    );

    let (status, body) = a.remove("serviceName=web").await;
    assert_eq!(status, StatusCode::OK, "remove: {body}");
    assert_eq!(registry.stored_spec("web").await, None);

    assert!(a.stop().await.success(), "A exits cleanly on SIGTERM");
    assert!(b.stop().await.success(), "B exits cleanly on SIGTERM");
    let after = reqwest::get(format!("http://127.0.0.1:{}/web", a.http_port)).await;
    assert!(
        after.as_ref().is_err_and(reqwest::Error::is_connect),
        "A's HAProxy stopped with it: {after:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ttl_checks_decide_which_instances_a_reconfigure_routes() {
    let registry = SharedRegistry::start().await;
    let proxy = ProxyProcess::start(&registry.address(), &[]).await;
    let one = spawn_backend("one").await;
    let two = spawn_backend("two").await;
    let check_one = registry
        .register_instance_with_ttl_check("web", "web.1", one.port)
        .await;
    registry
        .register_instance_with_ttl_check("web", "web.2", two.port)
        .await;
    assert_eq!(
        registry.passing_instance_ids("web").await,
        ["web.1", "web.2"]
    );

    registry.fail_check(&check_one).await;
    assert_eq!(registry.passing_instance_ids("web").await, ["web.2"]);
    proxy
        .reconfigure_ok("serviceName=web&servicePath=/web")
        .await;
    assert_eq!(proxy.names_answering("/web", None, 4).await, ["two"; 4]);

    registry.pass_check(&check_one).await;
    proxy
        .reconfigure_ok("serviceName=web&servicePath=/web")
        .await;
    let mut names = proxy.names_answering("/web", None, 4).await;
    names.sort();
    names.dedup();
    assert_eq!(names, ["one", "two"], "both healthy instances serve");

    registry.deregister_instance("web.2").await;
    assert_eq!(registry.passing_instance_ids("web").await, ["web.1"]);

    registry.put_kv("operators/note", "hello").await;
    assert_eq!(
        registry.get_kv_raw("operators/note").await.as_deref(),
        Some(&b"hello"[..])
    );
    assert_eq!(registry.get_kv_raw("operators/missing").await, None);
    assert_eq!(registry.kv_keys("operators/").await, ["operators/note"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_a_proxy_stops_it_and_its_haproxy() {
    let registry = SharedRegistry::start().await;
    let proxy = ProxyProcess::start(&registry.address(), &[]).await;
    let group = proxy.pid();
    let running = live_group_members(group);
    assert!(
        running.iter().any(|(_, name)| name == "haproxy"),
        "flow-proxy runs HAProxy in its process group: {running:?}"
    );
    drop(proxy);
    eventually(
        "nothing of the dropped proxy runs",
        Duration::from_secs(1),
        || async { live_group_members(group).is_empty() },
    )
    .await;
}

#[tokio::test]
async fn eventually_measures_from_the_call_and_gives_up_at_its_timeout() {
    let start = tokio::time::Instant::now();
    let took = eventually("the third check", Duration::from_secs(1), {
        let mut checks = 0;
        move || {
            checks += 1;
            std::future::ready(checks == 3)
        }
    })
    .await;
    assert!(
        took >= Duration::from_millis(40),
        "two pauses of ~20 ms: {took:?}"
    );
    assert!(took <= start.elapsed());

    let never = tokio::spawn(eventually("never", Duration::from_millis(100), || async {
        false
    }));
    let panic = never.await.expect_err("eventually panics at its timeout");
    let message = panic.into_panic();
    let message = message
        .downcast_ref::<String>()
        .expect("a formatted panic message");
    assert!(
        message.starts_with("never: still not the case after 100ms"),
        "{message}"
    );
}
