//! Who may call the API: credentials, loopback by default, browsers kept out, HEAD harmless,
//! and oversized requests refused. Every refused call changes nothing.

use std::net::{Ipv4Addr, SocketAddr};

use base64::Engine;
use flow_proxy::settings::Secret;
use flow_proxy::{FlowProxy, StartError};
use reqwest::{Method, StatusCode};
use serde_json::Value;

use crate::helpers::{spawn_backend, TestProxy};

const TOKEN: &str = "s3cret-token";

/// Sends `method path` to the API with extra headers; status, headers and body text.
async fn call(
    proxy: &TestProxy,
    method: Method,
    path: &str,
    headers: &[(&str, &str)],
) -> (StatusCode, reqwest::header::HeaderMap, String) {
    let mut request = proxy.http().request(method, proxy.api(path));
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let response = request.send().await.expect("the API answers");
    let status = response.status();
    let headers = response.headers().clone();
    (status, headers, response.text().await.expect("body"))
}

fn basic(user: &str, password: &str) -> String {
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"))
    )
}

async fn protected_proxy(open_reads: bool) -> TestProxy {
    TestProxy::spawn_with(|settings| {
        settings.api_token = Some(Secret::new(TOKEN));
        settings.api_users = Some(Secret::new("alice:wonderland"));
        settings.open_read_endpoints = open_reads;
    })
    .await
}

const RECONFIGURE: &str = "/v1/docker-flow-proxy/reconfigure?serviceName=app&servicePath=/app";

#[tokio::test]
async fn with_credentials_set_only_callers_who_present_them_change_routing() {
    let backend = spawn_backend("app").await;
    let proxy = protected_proxy(false).await;
    proxy.register_instance("app", "app-1", backend.port).await;
    let bearer = format!("Bearer {TOKEN}");

    let config_before =
        std::fs::read_to_string(proxy.data_dir().join("haproxy.cfg")).expect("haproxy.cfg");
    let wrong_password = basic("alice", "wrong");
    let unknown_user = basic("mallory", "wonderland");
    for refused in [
        vec![],
        vec![("authorization", "Bearer wrong")],
        vec![("authorization", TOKEN)],
        vec![("authorization", wrong_password.as_str())],
        vec![("authorization", unknown_user.as_str())],
    ] {
        let (status, headers, body) = call(&proxy, Method::GET, RECONFIGURE, &refused).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{refused:?}: {body}");
        let challenge = headers
            .get("www-authenticate")
            .and_then(|value| value.to_str().ok())
            .unwrap_or_default();
        assert!(challenge.contains("realm=\"flow-proxy\""), "{challenge}");
        let answer: Value = serde_json::from_str(&body).expect("JSON answer");
        assert_eq!(answer["Status"], "NOK");
        assert!(
            !body.contains(TOKEN) && !body.contains("wonderland"),
            "{body}"
        );
    }
    // Nothing changed: not routed, not stored, the same haproxy.cfg.
    assert_eq!(
        proxy.get_through_proxy("/app", None).await.0,
        StatusCode::SERVICE_UNAVAILABLE
    );
    assert_eq!(proxy.stored_spec("app").await, None);
    assert_eq!(
        std::fs::read_to_string(proxy.data_dir().join("haproxy.cfg")).expect("haproxy.cfg"),
        config_before
    );
    // The reads need credentials too, unless opened; ping never does.
    for read in ["/v1/docker-flow-proxy/config", "/services"] {
        assert_eq!(
            call(&proxy, Method::GET, read, &[]).await.0,
            StatusCode::UNAUTHORIZED
        );
        let (status, _, _) = call(&proxy, Method::GET, read, &[("authorization", &bearer)]).await;
        assert_eq!(status, StatusCode::OK, "{read}");
    }
    assert_eq!(
        call(&proxy, Method::GET, "/v1/docker-flow-proxy/ping", &[])
            .await
            .0,
        StatusCode::OK
    );

    // The token routes the service; a user's password removes and re-routes it.
    let (status, _, body) = call(
        &proxy,
        Method::GET,
        RECONFIGURE,
        &[("authorization", &bearer)],
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(
        proxy.get_through_proxy("/app", None).await,
        (StatusCode::OK, "app /app".into())
    );
    let alice = basic("alice", "wonderland");
    let (status, _, body) = call(
        &proxy,
        Method::GET,
        "/remove?serviceName=app",
        &[("authorization", &alice)],
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(
        proxy.get_through_proxy("/app", None).await.0,
        StatusCode::SERVICE_UNAVAILABLE
    );
}

#[tokio::test]
async fn open_read_endpoints_answer_without_credentials_but_changes_still_need_them() {
    let proxy = protected_proxy(true).await;
    for read in [
        "/v1/docker-flow-proxy/config",
        "/v1/docker-flow-proxy/services",
    ] {
        assert_eq!(
            call(&proxy, Method::GET, read, &[]).await.0,
            StatusCode::OK,
            "{read}"
        );
    }
    for change in [RECONFIGURE, "/remove?serviceName=app", "/reload"] {
        assert_eq!(
            call(&proxy, Method::GET, change, &[]).await.0,
            StatusCode::UNAUTHORIZED,
            "{change}"
        );
    }
}

#[tokio::test]
async fn the_token_can_come_from_a_file() {
    let secrets = tempfile::tempdir().expect("temporary directory");
    let token_file = secrets.path().join("api-token");
    std::fs::write(&token_file, format!("{TOKEN}\n")).expect("write the token file");
    let proxy = TestProxy::spawn_with(|settings| {
        settings.api_token_file = Some(token_file.clone());
    })
    .await;
    let bearer = format!("Bearer {TOKEN}");
    assert_eq!(
        call(&proxy, Method::GET, "/reload", &[]).await.0,
        StatusCode::UNAUTHORIZED
    );
    let (status, _, body) = call(
        &proxy,
        Method::GET,
        "/reload",
        &[("authorization", &bearer)],
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
}

#[tokio::test]
async fn without_credentials_only_requests_to_a_loopback_name_are_answered() {
    let backend = spawn_backend("app").await;
    let proxy = TestProxy::spawn().await;
    proxy.register_instance("app", "app-1", backend.port).await;

    // A page on another site that resolves its own name to 127.0.0.1 (DNS rebinding) sends its
    // own name as Host.
    for host in ["attacker.example", "attacker.example:8080", "10.1.2.3:8080"] {
        let (status, _, body) = call(&proxy, Method::GET, RECONFIGURE, &[("host", host)]).await;
        assert_eq!(status, StatusCode::FORBIDDEN, "{host}: {body}");
        assert!(body.contains("loopback"), "{body}");
        let (status, _, _) = call(&proxy, Method::GET, "/config", &[("host", host)]).await;
        assert_eq!(status, StatusCode::FORBIDDEN, "{host}");
    }
    assert_eq!(proxy.stored_spec("app").await, None);

    let (status, _, body) = call(
        &proxy,
        Method::GET,
        RECONFIGURE,
        &[("host", "localhost:8080")],
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(
        proxy.get_through_proxy("/app", None).await,
        (StatusCode::OK, "app /app".into())
    );
}

#[tokio::test]
async fn browsers_cannot_be_turned_against_the_api_and_head_changes_nothing() {
    let backend = spawn_backend("app").await;
    let proxy = TestProxy::spawn().await;
    proxy.register_instance("app", "app-1", backend.port).await;

    // A form or image on another site: the browser says so, or its Origin does.
    let host = proxy.api("").trim_start_matches("http://").to_string();
    let forged: [&[(&str, &str)]; 3] = [
        &[("sec-fetch-site", "cross-site")],
        &[("sec-fetch-site", "same-site")],
        &[("origin", "http://attacker.example")],
    ];
    for headers in forged {
        let (status, response_headers, body) =
            call(&proxy, Method::GET, RECONFIGURE, headers).await;
        assert_eq!(status, StatusCode::FORBIDDEN, "{headers:?}: {body}");
        assert!(response_headers
            .get("access-control-allow-origin")
            .is_none());
    }
    // HEAD is for reading: it never reconfigures or removes.
    let (status, _, _) = call(&proxy, Method::HEAD, RECONFIGURE, &[]).await;
    assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(proxy.stored_spec("app").await, None);
    assert_eq!(
        proxy.get_through_proxy("/app", None).await.0,
        StatusCode::SERVICE_UNAVAILABLE
    );

    // A CORS preflight gets no permission.
    let (_, headers, _) = call(
        &proxy,
        Method::OPTIONS,
        RECONFIGURE,
        &[
            ("origin", "http://attacker.example"),
            ("access-control-request-method", "PUT"),
        ],
    )
    .await;
    assert!(headers.get("access-control-allow-origin").is_none());

    // The API's own origin (a page served by the API itself, or a tool that sends one) works.
    let own_origin = format!("http://{host}");
    let (status, headers, body) = call(
        &proxy,
        Method::GET,
        RECONFIGURE,
        &[("origin", &own_origin), ("sec-fetch-site", "same-origin")],
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert!(headers.get("access-control-allow-origin").is_none());
    assert_eq!(
        proxy.get_through_proxy("/app", None).await,
        (StatusCode::OK, "app /app".into())
    );
}

#[tokio::test]
async fn an_api_beyond_loopback_without_credentials_does_not_start() {
    let data_dir = tempfile::tempdir().expect("temporary data directory");
    let mut settings = crate::helpers::test_settings(data_dir.path());
    settings.api_address = Some(SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0)));
    let error = match FlowProxy::start(settings).await {
        Ok(_) => panic!("flow-proxy started an open API on every address"),
        Err(error) => error,
    };
    assert!(matches!(error, StartError::OpenApi { .. }), "{error}");
    let message = error.to_string();
    for flag in ["--api-token", "--api-users", "--insecure-api"] {
        assert!(message.contains(flag), "{message}");
    }
    // It refused before starting anything: no HAProxy configuration was written.
    assert!(!data_dir.path().join("haproxy.cfg").exists());
}

#[tokio::test]
async fn oversized_requests_are_refused_with_414_and_413() {
    let proxy = TestProxy::spawn().await;
    let long_path = format!("/{}", "a".repeat(flow_proxy::api::MAX_QUERY_BYTES));
    let (status, _, body) = call(
        &proxy,
        Method::GET,
        &format!("/reconfigure?serviceName=app&servicePath={long_path}"),
        &[],
    )
    .await;
    assert_eq!(status, StatusCode::URI_TOO_LONG, "{body}");
    assert!(
        body.contains(&flow_proxy::api::MAX_QUERY_BYTES.to_string()),
        "{body}"
    );

    let response = proxy
        .http()
        .put(proxy.api("/reconfigure?serviceName=app&servicePath=/app"))
        .body(vec![b'x'; flow_proxy::api::MAX_BODY_BYTES + 1])
        .send()
        .await
        .expect("the API answers");
    assert_eq!(response.status(), StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(proxy.stored_spec("app").await, None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_token_and_users_never_reach_the_log_even_at_debug() {
    let registry = crate::fleet::SharedRegistry::start().await;
    let backend = spawn_backend("app").await;
    registry
        .register_instance("app", "app-1", backend.port)
        .await;
    let mut proxy = crate::fleet::ProxyProcess::start_with(
        &registry.address(),
        crate::fleet::ProxyOptions {
            env: vec![
                ("API_TOKEN".into(), "tokenSecret5".into()),
                ("API_USERS".into(), "carol:carolSecret6".into()),
                ("RUST_LOG".into(), "debug".into()),
            ],
            ..crate::fleet::ProxyOptions::default()
        },
    )
    .await;
    let bearer = format!("Bearer {}", "tokenSecret5");
    for authorization in [
        bearer.as_str(),
        &basic("carol", "carolSecret6"),
        "Bearer wrongSecret7",
    ] {
        proxy
            .http()
            .get(proxy.api(RECONFIGURE))
            .header("authorization", authorization)
            .send()
            .await
            .expect("the API answers");
    }
    assert_eq!(
        proxy.get_through_proxy("/app", None).await,
        (StatusCode::OK, "app /app".into())
    );
    proxy.stop().await;
    let log = proxy.log();
    assert!(log.contains("bearer token or basic auth"), "{log}");
    for secret in ["tokenSecret5", "carolSecret6", "wrongSecret7"] {
        assert!(!log.contains(secret), "the log shows {secret}:\n{log}");
    }
}
