//! Routing that scales: plain path and domain rules go through HAProxy map files, the other rules
//! keep their acls in the same order, and a plain route change reaches HAProxy without a reload
//! (and survives a later reload and a restart of flow-proxy).

use std::time::Duration;

use reqwest::StatusCode;

use crate::fleet::{eventually, ProxyProcess, SharedRegistry};
use crate::helpers::{spawn_backend, Backend, TestProxy};

/// The map file `name` in the proxy's data directory.
async fn map_file(proxy: &TestProxy, name: &str) -> String {
    proxy.live_file(&format!("maps/{name}")).await
}

/// Who answers `path` (with `host`), or the status when it is not 200.
async fn answer(proxy: &TestProxy, path: &str, host: Option<&str>) -> String {
    let (status, body) = proxy.get_through_proxy(path, host).await;
    if status == StatusCode::OK {
        body.split(' ').next().unwrap_or_default().to_string()
    } else {
        status.as_str().to_string()
    }
}

/// Registers one instance of each service, each answering with its own name.
async fn backends(proxy: &TestProxy, names: &[&str]) -> Vec<Backend> {
    let mut started = Vec::new();
    for name in names {
        let backend = spawn_backend(name).await;
        proxy
            .register_instance(name, &format!("{name}.1"), backend.port)
            .await;
        started.push(backend);
    }
    started
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_services_are_reached_through_a_map_file() {
    let proxy = TestProxy::spawn().await;
    let _backends = backends(&proxy, &["api", "shop", "blog"]).await;
    proxy
        .reconfigure_ok("serviceName=api&servicePath=/api,/v1/api")
        .await;
    proxy
        .reconfigure_ok("serviceName=shop&serviceDomain=shop.example.com&servicePath=/")
        .await;
    proxy
        .reconfigure_ok("serviceName=blog&serviceDomain=blog.example.com")
        .await;

    let config = proxy.config().await;
    for line in [
        "use_backend %[req.hdr(host),field(1,:),lower,map_str(maps/http-1.map)] if { req.hdr(host),field(1,:),lower,map_str(maps/http-1.map) -m found }",
        "use_backend %[req.hdr(host),field(1,:),lower,concat(,txn.flow_proxy_path,),map_beg(maps/http-2.map)] if { req.hdr(host),field(1,:),lower,concat(,txn.flow_proxy_path,),map_beg(maps/http-2.map) -m found }",
        "use_backend %[path,map_beg(maps/http-3.map)] if { path,map_beg(maps/http-3.map) -m found }",
    ] {
        assert!(
            config.lines().any(|l| l.trim() == line),
            "{line} in:\n{config}"
        );
    }
    assert!(
        !config.contains("acl path_api-be0"),
        "no acl for a plain rule:\n{config}"
    );
    // Both domain rules have no path longer than `/`: by name, blog first.
    assert_eq!(
        map_file(&proxy, "http-1.map").await,
        "blog.example.com blog-be0\n"
    );
    assert_eq!(
        map_file(&proxy, "http-2.map").await,
        "shop.example.com/ shop-be0\n"
    );
    assert_eq!(
        map_file(&proxy, "http-3.map").await,
        "/api api-be0\n/v1/api api-be0\n"
    );

    assert_eq!(answer(&proxy, "/api/users", None).await, "api");
    assert_eq!(answer(&proxy, "/v1/api", None).await, "api");
    assert_eq!(
        answer(&proxy, "/apix", None).await,
        "api",
        "path_beg: a prefix"
    );
    assert_eq!(answer(&proxy, "/v1", None).await, "503");
    // The host matches without its port and whatever its case; the path keeps its case.
    assert_eq!(
        answer(&proxy, "/cart", Some("Shop.Example.COM:8080")).await,
        "shop"
    );
    assert_eq!(answer(&proxy, "/", Some("blog.example.com")).await, "blog");
    assert_eq!(answer(&proxy, "/API", None).await, "503");
    assert_eq!(
        answer(&proxy, "/", Some("shop.example.com.evil")).await,
        "503",
        "a longer host is another host"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_and_acl_rules_keep_the_order_users_see() {
    let proxy = TestProxy::spawn().await;
    let _backends = backends(
        &proxy,
        &["api", "api-v2", "users", "legacy", "shop", "home"],
    )
    .await;
    for query in [
        "serviceName=api&servicePath=/api",
        "serviceName=api-v2&servicePath=/api&serviceHeader=X-Version:2",
        "serviceName=users&servicePath=/old/v1/users",
        "serviceName=legacy&servicePath=/old&servicePathExclude=/old/internal",
        "serviceName=shop&serviceDomain=shop.example.com&servicePath=/api",
        "serviceName=home&servicePath=/",
    ] {
        proxy.reconfigure_ok(query).await;
    }
    let config = proxy.config().await;
    assert!(
        config.contains("use_backend api-v2-be0 if path_api-v2-be0 header_api-v2-be0_1"),
        "{config}"
    );

    // The header rule for /api comes before the plain /api rule.
    let response = proxy
        .http()
        .get(format!("http://127.0.0.1:{}/api/x", proxy.http_port))
        .header("X-Version", "2")
        .send()
        .await
        .expect("HAProxy answers");
    assert_eq!(response.status(), StatusCode::OK);
    assert!(response.text().await.expect("body").starts_with("api-v2 "));
    assert_eq!(answer(&proxy, "/api/x", None).await, "api");
    // A longer plain path before a shorter acl rule, which keeps its exclusion.
    assert_eq!(answer(&proxy, "/old/v1/users/7", None).await, "users");
    assert_eq!(answer(&proxy, "/old/v2", None).await, "legacy");
    assert_eq!(
        answer(&proxy, "/old/internal", None).await,
        "home",
        "excluded from legacy: falls through to the catch-all"
    );
    // Domain rules before path-only rules; the catch-all last.
    assert_eq!(
        answer(&proxy, "/api/x", Some("shop.example.com")).await,
        "shop"
    );
    assert_eq!(answer(&proxy, "/elsewhere", None).await, "home");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plain_route_change_applies_without_a_reload_and_survives_reload_and_restart() {
    let mut proxy = TestProxy::spawn().await;
    let _backends = backends(&proxy, &["api", "web"]).await;
    proxy
        .reconfigure_ok("serviceName=api&servicePath=/api")
        .await;
    proxy
        .reconfigure_ok("serviceName=web&servicePath=/web")
        .await;
    let before = proxy.snapshot().await;
    let serving = proxy.haproxy_pid().await;

    // Another path, then a domain: only map entries change.
    proxy
        .reconfigure_ok("serviceName=api&servicePath=/api,/v2")
        .await;
    assert_eq!(answer(&proxy, "/v2/x", None).await, "api", "served at once");
    proxy
        .reconfigure_ok("serviceName=web&servicePath=/site")
        .await;
    assert_eq!(answer(&proxy, "/site/x", None).await, "web");
    assert_eq!(
        answer(&proxy, "/web/x", None).await,
        "503",
        "the old path is gone"
    );
    proxy.assert_unchanged_since(&before).await;
    assert_eq!(
        map_file(&proxy, "http-1.map").await,
        "/site pool-1\n/api api-be0\n/v2 api-be0\n",
        "the live map file agrees with what runs (web, added when the map existed, went live \
         without a reload in pool backend 1)"
    );

    // A reload reads the map files: nothing changes for a user.
    let (status, body) = proxy.api_get("/v1/docker-flow-proxy/reload").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_ne!(proxy.haproxy_pid().await, serving, "reloaded");
    for (path, expected) in [
        ("/v2/x", "api"),
        ("/api", "api"),
        ("/site", "web"),
        ("/web", "503"),
    ] {
        assert_eq!(
            answer(&proxy, path, None).await,
            expected,
            "{path} after the reload"
        );
    }

    // A restart of flow-proxy restores the same routes, and a change after it is again runtime.
    proxy.stop().await;
    proxy.start_again().await;
    for (path, expected) in [("/v2/x", "api"), ("/site", "web"), ("/web", "503")] {
        assert_eq!(
            answer(&proxy, path, None).await,
            expected,
            "{path} after the restart"
        );
    }
    let after_restart = proxy.snapshot().await;
    proxy
        .reconfigure_ok("serviceName=web&servicePath=/site,/web")
        .await;
    assert_eq!(answer(&proxy, "/web/x", None).await, "web");
    proxy.assert_unchanged_since(&after_restart).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_haproxy_rejects_leaves_the_live_maps_as_they_were() {
    let proxy = TestProxy::spawn().await;
    let _backends = backends(&proxy, &["api"]).await;
    proxy
        .reconfigure_ok("serviceName=api&servicePath=/api")
        .await;
    let before = proxy.snapshot().await;
    let map_before = map_file(&proxy, "http-1.map").await;

    // A new plain path (a map entry) with a regex HAProxy refuses, in one request.
    let (status, body) = proxy
        .reconfigure("serviceName=api&servicePath=/api,/new&pathType.1=path_reg&servicePath.1=/x[")
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    proxy.assert_unchanged_since(&before).await;
    assert_eq!(map_file(&proxy, "http-1.map").await, map_before);
    assert_eq!(answer(&proxy, "/new", None).await, "503");
    assert_eq!(answer(&proxy, "/api", None).await, "api");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plain_route_change_made_on_another_proxy_reaches_this_one_without_a_reload() {
    let registry = SharedRegistry::start().await;
    let address = registry.address();
    let (a, b) = tokio::join!(
        ProxyProcess::start(&address, &[]),
        ProxyProcess::start(&address, &[])
    );
    let web = spawn_backend("web").await;
    registry.register_instance("web", "web.1", web.port).await;
    a.reconfigure_ok("serviceName=web&servicePath=/web").await;
    eventually("B routes /web", Duration::from_secs(10), || async {
        b.get_through_proxy("/web", None).await.0 == StatusCode::OK
    })
    .await;
    let serving = b.haproxy_pid().await;
    assert!(serving.is_some(), "B's HAProxy answers");

    a.reconfigure_ok("serviceName=web&servicePath=/web,/site")
        .await;
    eventually("B routes /site", Duration::from_secs(10), || async {
        b.get_through_proxy("/site", None).await.0 == StatusCode::OK
    })
    .await;
    assert_eq!(b.haproxy_pid().await, serving, "B did not reload");
    assert_eq!(
        b.live_file("maps/http-1.map").await,
        "/web web-be0\n/site web-be0\n"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_haproxy_comes_back_with_the_routes_changed_at_runtime() {
    let proxy = TestProxy::spawn().await;
    let _backends = backends(&proxy, &["api"]).await;
    proxy
        .reconfigure_ok("serviceName=api&servicePath=/api")
        .await;
    let serving = proxy.haproxy_pid().await.expect("HAProxy answers");
    proxy
        .reconfigure_ok("serviceName=api&servicePath=/v2")
        .await;
    assert_eq!(proxy.haproxy_pid().await, Some(serving), "no reload");

    // The supervisor replaces a dead HAProxy from the live files, maps included.
    crate::fleet::kill_processes(&[serving]);
    eventually("a new HAProxy serves", Duration::from_secs(10), || async {
        matches!(proxy.haproxy_pid().await, Some(pid) if pid != serving)
    })
    .await;
    assert_eq!(answer(&proxy, "/v2/x", None).await, "api");
    assert_eq!(answer(&proxy, "/api/x", None).await, "503");
}
