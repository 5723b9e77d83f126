//! HAProxy's stats page: off unless `--stats-user` and `--stats-pass` are both set; then behind
//! basic auth at `--stats-uri`, on the HTTP port (before any service rule, even a catch-all) or
//! on `--stats-port`. Every request goes through the real HAProxy.

use flow_proxy::settings::Secret;
use flow_proxy::{FlowProxy, StartError};
use reqwest::StatusCode;

use crate::helpers::{free_port, spawn_backend, test_settings, TestProxy};

/// Status, `WWW-Authenticate` and body of `GET http://127.0.0.1:<port><uri>`.
async fn get_stats(
    proxy: &TestProxy,
    port: u16,
    uri: &str,
    credentials: Option<(&str, &str)>,
) -> (StatusCode, Option<String>, String) {
    let mut request = proxy.http().get(format!("http://127.0.0.1:{port}{uri}"));
    if let Some((user, password)) = credentials {
        request = request.basic_auth(user, Some(password));
    }
    let response = request
        .send()
        .await
        .unwrap_or_else(|error| panic!("HAProxy answers GET {uri} on {port}: {error}"));
    let status = response.status();
    let challenge = response
        .headers()
        .get(reqwest::header::WWW_AUTHENTICATE)
        .map(|value| value.to_str().expect("ASCII challenge").to_string());
    (status, challenge, response.text().await.expect("body"))
}

fn with_stats(settings: &mut flow_proxy::settings::Settings) {
    settings.stats_user = Some("admin".into());
    settings.stats_pass = Some(Secret::new("stats-pass-1"));
}

#[tokio::test]
async fn the_stats_page_on_the_http_port_asks_for_credentials_then_shows_haproxy_stats() {
    let proxy = TestProxy::spawn_with(with_stats).await;
    // A catch-all service must not swallow the stats URI.
    let backend = spawn_backend("catch-all").await;
    proxy.register_instance("web", "web-1", backend.port).await;
    proxy.reconfigure_ok("serviceName=web&servicePath=/").await;
    let port = proxy.http_port;

    let (status, challenge, _) = get_stats(&proxy, port, "/admin?stats", None).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(challenge.as_deref(), Some("Basic realm=\"stats\""));
    let (status, _, _) = get_stats(&proxy, port, "/admin?stats", Some(("admin", "wrong"))).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);

    let credentials = Some(("admin", "stats-pass-1"));
    let (status, _, html) = get_stats(&proxy, port, "/admin?stats", credentials).await;
    assert_eq!(status, StatusCode::OK, "{html}");
    assert!(html.contains("Statistics Report"), "{html}");
    let (status, _, csv) = get_stats(&proxy, port, "/admin?stats;csv", credentials).await;
    assert_eq!(status, StatusCode::OK, "{csv}");
    assert!(csv.starts_with("# pxname,svname,"), "{csv}");
    assert!(
        csv.contains("\nweb-be0,"),
        "the routed backend is listed: {csv}"
    );

    // Everything else still reaches the service.
    let (status, body) = proxy.get_through_proxy("/admin", None).await;
    assert_eq!(
        (status, body.as_str()),
        (StatusCode::OK, "catch-all /admin")
    );

    let config = proxy.config().await;
    assert!(
        !config.contains("stats-pass-1") && !config.contains("$6$"),
        "{config}"
    );
}

#[tokio::test]
async fn the_stats_page_can_have_its_own_port_and_uri() {
    let stats_port = free_port();
    let proxy = TestProxy::spawn_with(|settings| {
        with_stats(settings);
        settings.stats_port = Some(stats_port);
        settings.stats_uri = "/haproxy/stats".into();
    })
    .await;
    let (status, _, _) = get_stats(&proxy, stats_port, "/haproxy/stats", None).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let (status, _, html) = get_stats(
        &proxy,
        stats_port,
        "/haproxy/stats",
        Some(("admin", "stats-pass-1")),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{html}");
    assert!(html.contains("Statistics Report"), "{html}");
    // Not on the HTTP port: there no rule matches.
    let (status, _, _) = get_stats(
        &proxy,
        proxy.http_port,
        "/haproxy/stats",
        Some(("admin", "stats-pass-1")),
    )
    .await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
}

#[tokio::test]
async fn the_stats_page_is_off_without_both_credentials() {
    let proxy = TestProxy::spawn().await;
    let (status, _, _) = get_stats(
        &proxy,
        proxy.http_port,
        "/admin?stats",
        Some(("admin", "stats-pass-1")),
    )
    .await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(!proxy.config().await.contains("stats uri"));

    let data_dir = tempfile::tempdir().expect("data dir");
    let mut settings = test_settings(data_dir.path());
    settings.stats_user = Some("admin".into());
    match FlowProxy::start(settings).await {
        Err(StartError::StatsCredentials) => {}
        Err(other) => panic!("expected the missing stats password to be named, got {other}"),
        Ok(_) => panic!("flow-proxy started with a stats user and no password"),
    }
}
