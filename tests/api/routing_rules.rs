//! Docker Flow Proxy's remaining routing parameters, as a user sees them through the real
//! HAProxy: `servicePathExclude`, `serviceHeader`, `userAgent`, `isDefaultBackend`,
//! `outboundHostname`, and `reqMode=sni` (TLS passed through by server name, over a real TLS
//! connection to backends that terminate TLS themselves).

use reqwest::StatusCode;

use crate::helpers::{free_port, proxy_routing_demo, spawn_backend, Backend, TestProxy};
use crate::tls::{client_config, https_request, spawn_tls_backend, tls_connect, TestCa};

/// A proxy with one instance registered per name (each a backend answering `<name> <path>`).
async fn proxy_with(names: &[&'static str]) -> (TestProxy, Vec<Backend>) {
    let proxy = TestProxy::spawn().await;
    let mut backends = Vec::new();
    for name in names {
        let backend = spawn_backend(name).await;
        proxy
            .register_instance(name, &format!("{name}-1"), backend.port)
            .await;
        backends.push(backend);
    }
    (proxy, backends)
}

/// `GET <path>` through HAProxy with extra request headers; status and body.
async fn get_with(proxy: &TestProxy, path: &str, headers: &[(&str, &str)]) -> (StatusCode, String) {
    let mut request = proxy.http().get(format!(
        "http://127.0.0.1:{}{path}",
        proxy.settings().http_port
    ));
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let response = request
        .send()
        .await
        .unwrap_or_else(|error| panic!("HAProxy answers GET {path}: {error}"));
    let status = response.status();
    (status, response.text().await.expect("body"))
}

fn assert_answered_by(answer: &(StatusCode, String), name: &str, path: &str) {
    assert_eq!(answer.0, StatusCode::OK, "{answer:?}");
    assert_eq!(answer.1, format!("{name} {path}"), "{answer:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_excluded_path_never_reaches_the_service_and_falls_through_to_the_next_rule() {
    let (proxy, _backends) = proxy_with(&["api", "home"]).await;
    proxy
        .reconfigure_ok(
            "serviceName=api&servicePath=/api&servicePathExclude=/api/internal,/api/admin",
        )
        .await;
    assert_answered_by(
        &get_with(&proxy, "/api/books", &[]).await,
        "api",
        "/api/books",
    );
    for excluded in ["/api/internal", "/api/internal/keys", "/api/admin"] {
        let (status, body) = get_with(&proxy, excluded, &[]).await;
        assert_eq!(
            status,
            StatusCode::SERVICE_UNAVAILABLE,
            "{excluded}: {body}"
        );
    }

    // A catch-all service now gets what `api` excludes.
    proxy.reconfigure_ok("serviceName=home&servicePath=/").await;
    assert_answered_by(
        &get_with(&proxy, "/api/internal/keys", &[]).await,
        "home",
        "/api/internal/keys",
    );
    assert_answered_by(
        &get_with(&proxy, "/api/books", &[]).await,
        "api",
        "/api/books",
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_header_or_user_agent_picks_another_service_than_the_same_path_without_it() {
    let (proxy, _backends) = proxy_with(&["api", "api-v2", "api-bots"]).await;
    proxy
        .reconfigure_ok("serviceName=api&servicePath=/api")
        .await;
    // Same path as `api`: not a route conflict, because the condition tells them apart.
    proxy
        .reconfigure_ok("serviceName=api-v2&servicePath=/api&serviceHeader=X-Version:2")
        .await;
    proxy
        .reconfigure_ok("serviceName=api-bots&servicePath=/api&userAgent=googlebot,bingbot")
        .await;

    assert_answered_by(&get_with(&proxy, "/api/x", &[]).await, "api", "/api/x");
    assert_answered_by(
        &get_with(&proxy, "/api/x", &[("X-Version", "2")]).await,
        "api-v2",
        "/api/x",
    );
    // The value must match exactly.
    assert_answered_by(
        &get_with(&proxy, "/api/x", &[("X-Version", "3")]).await,
        "api",
        "/api/x",
    );
    // The user agent contains one of the values, in any case.
    let googlebot = "Mozilla/5.0 (compatible; Googlebot/2.1; +http://www.google.com/bot.html)";
    assert_answered_by(
        &get_with(&proxy, "/api/x", &[("User-Agent", googlebot)]).await,
        "api-bots",
        "/api/x",
    );
    assert_answered_by(
        &get_with(&proxy, "/api/x", &[("User-Agent", "curl/8.0")]).await,
        "api",
        "/api/x",
    );

    // The very same condition on the same path is a conflict, named.
    let (status, body) = proxy
        .reconfigure("serviceName=api-v2-copy&servicePath=/api&serviceHeader=X-Version:2")
        .await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    assert!(body.to_string().contains("api-v2"), "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_no_rule_matched_reach_the_default_backend_and_only_one_service_may_be_it() {
    let (proxy, _backends) = proxy_with(&["fallback", "other", "demo"]).await;
    proxy
        .reconfigure_ok("serviceName=demo&servicePath=/demo")
        .await;
    let (status, _) = get_with(&proxy, "/nowhere", &[]).await;
    assert_eq!(
        status,
        StatusCode::SERVICE_UNAVAILABLE,
        "no default backend yet"
    );

    proxy
        .reconfigure_ok("serviceName=fallback&servicePath=/fallback&isDefaultBackend=true")
        .await;
    assert_answered_by(
        &get_with(&proxy, "/nowhere", &[]).await,
        "fallback",
        "/nowhere",
    );
    assert_answered_by(&get_with(&proxy, "/demo/1", &[]).await, "demo", "/demo/1");

    // A second default backend is refused, naming the first, and changes nothing.
    let before = proxy.snapshot().await;
    let (status, body) = proxy
        .reconfigure("serviceName=other&servicePath=/other&isDefaultBackend=true")
        .await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    assert!(body.to_string().contains("`fallback`"), "{body}");
    proxy.assert_unchanged_since(&before).await;

    // The same service may say it again.
    proxy
        .reconfigure_ok("serviceName=fallback&servicePath=/fallback,/fb&isDefaultBackend=true")
        .await;
    assert_answered_by(
        &get_with(&proxy, "/still/nowhere", &[]).await,
        "fallback",
        "/still/nowhere",
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outbound_hostname_answers_without_any_consul_registration() {
    let proxy = TestProxy::spawn().await;
    let partner = spawn_backend("partner").await;
    // Nothing is registered under `partner` in the registry.
    proxy
        .reconfigure_ok(&format!(
            "serviceName=partner&servicePath=/partner&outboundHostname=localhost&port={}",
            partner.port
        ))
        .await;
    assert_answered_by(
        &get_with(&proxy, "/partner/x", &[]).await,
        "partner",
        "/partner/x",
    );
    let config = proxy.config().await;
    assert!(
        config.contains(&format!("server localhost_{0} localhost:{0}", partner.port)),
        "{config}"
    );

    // Without `port` there is nothing to connect to: refused, naming the parameter.
    let (status, body) = proxy
        .reconfigure("serviceName=partner2&servicePath=/partner2&outboundHostname=localhost")
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert!(body.to_string().contains("outboundHostname"), "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outbound_destination_ignores_consul_instances_and_is_restored_after_a_restart() {
    let mut proxy = TestProxy::spawn().await;
    let partner = spawn_backend("partner").await;
    let impostor = spawn_backend("impostor").await;
    proxy
        .reconfigure_ok(&format!(
            "serviceName=partner&servicePath=/partner&outboundHostname=127.0.0.1&port={}",
            partner.port
        ))
        .await;
    // An instance registered under the same name is not where the destination forwards.
    proxy
        .register_instance("partner", "partner-1", impostor.port)
        .await;
    let (status, body) = proxy.api_get("/v1/docker-flow-proxy/reload").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let names = proxy.names_answering("/partner/x", None, 4).await;
    assert!(names.iter().all(|name| name == "partner"), "{names:?}");

    proxy.stop().await;
    proxy.start_again().await;
    assert_answered_by(
        &get_with(&proxy, "/partner/y", &[]).await,
        "partner",
        "/partner/y",
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_routing_values_get_400_naming_the_parameter_and_change_nothing() {
    let (proxy, _backend) = proxy_routing_demo().await;
    let before = proxy.snapshot().await;
    for (query, parameter) in [
        (
            "serviceName=x&servicePath=/x&serviceHeader=X-Version%3A2%0Aacl%20a",
            "serviceHeader",
        ),
        (
            "serviceName=x&servicePath=/x&serviceHeader=X-Version",
            "serviceHeader",
        ),
        (
            "serviceName=x&servicePath=/x&userAgent=Mozilla%205.0",
            "userAgent",
        ),
        (
            "serviceName=x&servicePath.1=/x&userAgent.1=a%23b",
            "userAgent.1",
        ),
        (
            "serviceName=x&servicePath=/x&servicePathExclude=/a%20b",
            "servicePathExclude",
        ),
        (
            "serviceName=x&servicePath=/x&port=80&outboundHostname=evil%20host",
            "outboundHostname",
        ),
        (
            "serviceName=x&servicePath=/x&isDefaultBackend=maybe",
            "isDefaultBackend",
        ),
    ] {
        let (status, body) = proxy.reconfigure(query).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{query}: {body}");
        assert!(
            body.to_string().contains(&format!("`{parameter}`")),
            "{query}: {body}"
        );
    }
    proxy.assert_unchanged_since(&before).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_sni_services_on_one_src_port_each_answer_their_own_name_through_tls() {
    let ca = TestCa::new();
    let alpha_name = "alpha.example.test";
    let beta_name = "beta.example.test";
    let alpha = spawn_tls_backend("alpha", &ca.bundle(&[alpha_name])).await;
    let beta = spawn_tls_backend("beta", &ca.bundle(&[beta_name])).await;
    let proxy = TestProxy::spawn().await;
    proxy
        .register_instance("alpha", "alpha-1", alpha.port)
        .await;
    proxy.register_instance("beta", "beta-1", beta.port).await;
    let port = free_port();
    proxy
        .reconfigure_ok(&format!(
            "serviceName=alpha&reqMode=sni&srcPort={port}&serviceDomain={alpha_name}"
        ))
        .await;
    proxy
        .reconfigure_ok(&format!(
            "serviceName=beta&reqMode=sni&srcPort={port}&serviceDomain={beta_name}"
        ))
        .await;

    // HAProxy holds no certificate: each handshake is the backend's own, verified against
    // the test CA for the name asked.
    for (name, backend) in [(alpha_name, "alpha"), (beta_name, "beta")] {
        let answer = https_request(port, &ca.root, "GET", "/hello", name, &[]).await;
        assert_eq!(answer.status, 200, "{name}: {answer:?}");
        assert_eq!(
            answer.body,
            format!("{backend} /hello"),
            "{name}: {answer:?}"
        );
    }
    // A name nobody claims gets no backend: the connection is closed, no handshake.
    let unclaimed = tls_connect(
        port,
        "gamma.example.test",
        client_config(&ca.root, &[b"http/1.1"]),
    )
    .await;
    assert!(unclaimed.is_err(), "no backend for an unclaimed name");

    // The same name on the same port is a route conflict, naming the owner.
    let before = proxy.snapshot().await;
    let (status, body) = proxy
        .reconfigure(&format!(
            "serviceName=alpha2&reqMode=sni&srcPort={port}&serviceDomain={alpha_name}"
        ))
        .await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    assert!(body.to_string().contains("`alpha`"), "{body}");
    // An sni port is shared by sni destinations only.
    let (status, body) = proxy
        .reconfigure(&format!("serviceName=web&servicePath=/web&srcPort={port}"))
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert!(body.to_string().contains(&port.to_string()), "{body}");
    proxy.assert_unchanged_since(&before).await;
}
