//! Edge rules a user sets per service: HTTPS redirects (`httpsOnly`, `--https-only`,
//! `redirectWhenHttpProto`, `redirectFromDomain`), header rules, method rules and `denyHttp`.
//! Every request goes through the real HAProxy, over plain TCP or a real TLS handshake.

use std::net::Ipv4Addr;

use reqwest::StatusCode;

use crate::helpers::TestProxy;
use crate::tls::{http_request, https_request, put_cert, RawAnswer, TestCa};

/// A backend that answers `<name> <method> <path>` and then one `name: value` line per
/// request header it received, and sets `X-Backend-Internal: secret` on its answer.
struct EchoBackend {
    port: u16,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for EchoBackend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn spawn_echo_backend(name: &'static str) -> EchoBackend {
    let listener = tokio::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .await
        .expect("bind backend");
    let port = listener.local_addr().expect("address").port();
    let app =
        axum::Router::new().fallback(
            move |method: axum::http::Method,
                  uri: axum::http::Uri,
                  headers: axum::http::HeaderMap| async move {
                let mut body = format!("{name} {method} {}\n", uri.path());
                for (header, value) in &headers {
                    body.push_str(&format!(
                        "{header}: {}\n",
                        String::from_utf8_lossy(value.as_bytes())
                    ));
                }
                ([("X-Backend-Internal", "secret")], body)
            },
        );
    let task = tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    EchoBackend { port, task }
}

fn http_port(proxy: &TestProxy) -> u16 {
    proxy.settings().http_port
}

fn https_port(proxy: &TestProxy) -> u16 {
    proxy.settings().https_port
}

/// A proxy with `app` (an [`EchoBackend`]) registered and a certificate for `names`.
async fn proxy_with_tls(
    ca: &TestCa,
    names: &[&str],
    customise: impl FnOnce(&mut flow_proxy::settings::Settings),
) -> (TestProxy, EchoBackend) {
    let backend = spawn_echo_backend("app").await;
    let proxy = TestProxy::spawn_with(customise).await;
    proxy.register_instance("app", "app-1", backend.port).await;
    let (status, answer) = put_cert(&proxy, "edge", &ca.bundle(names)).await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    (proxy, backend)
}

fn assert_redirect(answer: &RawAnswer, code: u16, location: &str) {
    assert_eq!(answer.status, code, "{answer:?}");
    assert_eq!(answer.header("location"), Some(location), "{answer:?}");
}

fn assert_reached_app(answer: &RawAnswer, method: &str, path: &str) {
    assert_eq!(answer.status, 200, "{answer:?}");
    assert!(
        answer.body.starts_with(&format!("app {method} {path}\n")),
        "{answer:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_only_redirects_plain_http_with_its_code_and_tls_reaches_the_backend() {
    let ca = TestCa::new();
    let (proxy, _backend) = proxy_with_tls(&ca, &["app.example.test"], |_| {}).await;
    proxy
        .reconfigure_ok(
            "serviceName=app&servicePath=/plain&servicePath.1=/moved&httpsOnly.1=true\
             &httpsRedirectCode.1=301&servicePath.2=/temporary&httpsOnly.2=true",
        )
        .await;

    let moved = http_request(
        http_port(&proxy),
        "GET",
        "/moved/page?lang=en&x=1",
        "app.example.test",
        &[],
    )
    .await;
    assert_redirect(
        &moved,
        301,
        "https://app.example.test/moved/page?lang=en&x=1",
    );
    // Docker Flow Proxy's default code is 302.
    let temporary = http_request(
        http_port(&proxy),
        "GET",
        "/temporary",
        "app.example.test",
        &[],
    )
    .await;
    assert_redirect(&temporary, 302, "https://app.example.test/temporary");
    // A destination without httpsOnly is still served over plain HTTP.
    let plain = http_request(http_port(&proxy), "GET", "/plain", "app.example.test", &[]).await;
    assert_reached_app(&plain, "GET", "/plain");

    // Over TLS the same requests reach the backend, marked https.
    let root = &ca.root;
    for path in ["/moved/page", "/temporary"] {
        let answer = https_request(
            https_port(&proxy),
            root,
            "GET",
            path,
            "app.example.test",
            &[],
        )
        .await;
        assert_reached_app(&answer, "GET", path);
        assert!(
            answer.body.contains("x-forwarded-proto: https\n"),
            "{answer:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_https_only_flag_redirects_every_service() {
    let ca = TestCa::new();
    let (proxy, _backend) = proxy_with_tls(&ca, &["app.example.test"], |settings| {
        settings.https_only = true
    })
    .await;
    proxy.reconfigure_ok("serviceName=app&servicePath=/").await;

    let answer = http_request(
        http_port(&proxy),
        "GET",
        "/any?q=1",
        "app.example.test",
        &[],
    )
    .await;
    assert_redirect(&answer, 302, "https://app.example.test/any?q=1");
    let answer = https_request(
        https_port(&proxy),
        &ca.root,
        "GET",
        "/any",
        "app.example.test",
        &[],
    )
    .await;
    assert_reached_app(&answer, "GET", "/any");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redirect_when_http_proto_follows_the_balancer_header_and_never_loops() {
    let backend = spawn_echo_backend("app").await;
    let proxy = TestProxy::spawn().await;
    proxy.register_instance("app", "app-1", backend.port).await;
    // httpsOnly too: behind a balancer that terminates TLS every request arrives in plain HTTP,
    // so a redirect on the connection alone would loop forever (Docker Flow Proxy's ELB loop).
    proxy
        .reconfigure_ok("serviceName=app&servicePath=/&redirectWhenHttpProto=true&httpsOnly=true")
        .await;

    let from_tls = http_request(
        http_port(&proxy),
        "GET",
        "/page",
        "app.example.test",
        &[("X-Forwarded-Proto", "https")],
    )
    .await;
    assert_reached_app(&from_tls, "GET", "/page");
    let from_plain = http_request(
        http_port(&proxy),
        "GET",
        "/page?a=b",
        "app.example.test",
        &[("X-Forwarded-Proto", "http")],
    )
    .await;
    assert_redirect(&from_plain, 302, "https://app.example.test/page?a=b");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redirect_from_domain_answers_301_to_the_first_service_domain() {
    let ca = TestCa::new();
    let (proxy, _backend) =
        proxy_with_tls(&ca, &["new.example.test", "old.example.test"], |_| {}).await;

    // Without a serviceDomain there is nowhere to redirect to.
    let before = proxy.snapshot().await;
    let (status, answer) = proxy
        .reconfigure("serviceName=app&servicePath=/&redirectFromDomain=old.example.test")
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{answer}");
    assert!(
        answer["Message"]
            .as_str()
            .unwrap_or_default()
            .contains("redirectFromDomain"),
        "{answer}"
    );
    proxy.assert_unchanged_since(&before).await;

    proxy
        .reconfigure_ok(
            "serviceName=app&serviceDomain=new.example.test,www.new.example.test\
             &redirectFromDomain=old.example.test,legacy.example.test",
        )
        .await;
    for old in ["old.example.test", "legacy.example.test:8080"] {
        let answer = http_request(http_port(&proxy), "GET", "/a/b?x=1", old, &[]).await;
        assert_redirect(&answer, 301, "http://new.example.test/a/b?x=1");
    }
    let answer = https_request(
        https_port(&proxy),
        &ca.root,
        "GET",
        "/a",
        "old.example.test",
        &[],
    )
    .await;
    assert_redirect(&answer, 301, "https://new.example.test/a");
    let answer = http_request(http_port(&proxy), "GET", "/a/b", "new.example.test", &[]).await;
    assert_reached_app(&answer, "GET", "/a/b");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn header_rules_change_what_the_backend_and_the_client_see() {
    let backend = spawn_echo_backend("app").await;
    let proxy = TestProxy::spawn().await;
    proxy.register_instance("app", "app-1", backend.port).await;
    proxy
        .reconfigure_ok(&query(&[
            ("serviceName", "app"),
            ("servicePath", "/"),
            (
                "addReqHeader",
                "X-Added hello world,X-Literal on if { ssl_fc } {{config}}",
            ),
            ("setReqHeader", "X-Set fixed"),
            ("delReqHeader", "X-Secret"),
            ("addResHeader", "X-Served-By flow-proxy"),
            ("delResHeader", "X-Backend-Internal"),
        ]))
        .await;

    let answer = http_request(
        http_port(&proxy),
        "GET",
        "/h",
        "app.example.test",
        &[("X-Secret", "s3cret"), ("X-Set", "from-client")],
    )
    .await;
    assert_reached_app(&answer, "GET", "/h");
    let seen = &answer.body;
    assert!(seen.contains("\nx-added: hello world\n"), "{seen}");
    // Taken literally: no condition, no template expansion.
    assert!(
        seen.contains("\nx-literal: on if { ssl_fc } {{config}}\n"),
        "{seen}"
    );
    assert!(seen.contains("\nx-set: fixed\n"), "{seen}");
    assert!(!seen.contains("from-client"), "{seen}");
    assert!(!seen.contains("x-secret"), "{seen}");
    assert!(!seen.contains("s3cret"), "{seen}");
    assert_eq!(
        answer.header("x-served-by"),
        Some("flow-proxy"),
        "{answer:?}"
    );
    assert_eq!(answer.header("x-backend-internal"), None, "{answer:?}");

    // The spec keeps the rules as given, in KV and in answers.
    let stored = proxy.stored_spec("app").await.expect("stored spec");
    assert_eq!(stored["SetReqHeader"][0], "X-Set fixed", "{stored}");
    assert_eq!(stored["DelResHeader"][0], "X-Backend-Internal", "{stored}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hsts_reaches_the_client_over_tls() {
    let ca = TestCa::new();
    let (proxy, _backend) = proxy_with_tls(&ca, &["app.example.test"], |_| {}).await;
    proxy
        .reconfigure_ok(&query(&[
            ("serviceName", "app"),
            ("servicePath", "/"),
            ("setResHeader", "Strict-Transport-Security max-age=31536000"),
        ]))
        .await;

    let answer = https_request(
        https_port(&proxy),
        &ca.root,
        "GET",
        "/",
        "app.example.test",
        &[],
    )
    .await;
    assert_reached_app(&answer, "GET", "/");
    assert_eq!(
        answer.header("strict-transport-security"),
        Some("max-age=31536000"),
        "{answer:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn values_that_could_break_out_of_a_rule_are_refused_and_change_nothing() {
    let proxy = TestProxy::spawn().await;
    proxy.reconfigure_ok("serviceName=app&servicePath=/").await;
    let before = proxy.snapshot().await;

    for (parameter, value) in [
        ("addReqHeader", "X-A a\nhttp-request deny"),
        ("addReqHeader", "X-A a\r\nX-B: b"),
        ("setReqHeader", "X-A \"quoted\""),
        ("setReqHeader", "X-A %[src]"),
        ("setResHeader", "X-A a#comment"),
        ("setResHeader", "X-A back\\slash"),
        ("addResHeader", "X-A ${HOME}"),
        ("addResHeader", "X-A"),
        ("addReqHeader", "X:A value"),
        ("addReqHeader", "X\"A value"),
        ("delReqHeader", "X-A value"),
        ("delResHeader", "X-A\tB"),
        ("httpsOnly", "yes"),
        ("httpsRedirectCode", "304"),
        ("httpsRedirectCode", "302 if TRUE"),
        ("redirectWhenHttpProto", "on"),
        ("redirectFromDomain", "old.example.test"),
        ("allowedMethods", "get"),
        ("deniedMethods", "DELETE }"),
        ("denyHttp", "maybe"),
    ] {
        let query = query(&[
            ("serviceName", "app"),
            ("servicePath", "/"),
            (parameter, value),
        ]);
        let (status, answer) = proxy.reconfigure(&query).await;
        assert_eq!(
            status,
            StatusCode::BAD_REQUEST,
            "{parameter}={value:?}: {answer}"
        );
        let message = answer["Message"].as_str().unwrap_or_default();
        assert!(
            message.contains(parameter),
            "{parameter}={value:?}: {message}"
        );
    }
    proxy.assert_unchanged_since(&before).await;
}

/// A query string with every value percent-encoded (all but unreserved characters).
fn query(pairs: &[(&str, &str)]) -> String {
    let encode = |value: &str| -> String {
        value
            .bytes()
            .map(|b| {
                if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
                    (b as char).to_string()
                } else {
                    format!("%{b:02X}")
                }
            })
            .collect()
    };
    pairs
        .iter()
        .map(|(name, value)| format!("{name}={}", encode(value)))
        .collect::<Vec<_>>()
        .join("&")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn allowed_and_denied_methods_answer_405_through_haproxy() {
    let backend = spawn_echo_backend("app").await;
    let proxy = TestProxy::spawn().await;
    proxy.register_instance("app", "app-1", backend.port).await;
    proxy
        .reconfigure_ok(
            "serviceName=app&servicePath=/write&deniedMethods=DELETE\
             &servicePath.1=/read&allowedMethods.1=GET,HEAD",
        )
        .await;

    let port = http_port(&proxy);
    for (method, path, status) in [
        ("GET", "/read", 200),
        ("HEAD", "/read", 200),
        ("POST", "/read", 405),
        ("DELETE", "/read", 405),
        ("POST", "/write", 200),
        ("PUT", "/write", 200),
        ("DELETE", "/write", 405),
    ] {
        let answer = http_request(port, method, path, "app.example.test", &[]).await;
        assert_eq!(answer.status, status, "{method} {path}: {answer:?}");
        if status == 200 && method != "HEAD" {
            assert_reached_app(&answer, method, path);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deny_http_refuses_plain_http_with_403_and_serves_tls() {
    let ca = TestCa::new();
    let (proxy, _backend) = proxy_with_tls(&ca, &["app.example.test"], |_| {}).await;
    proxy
        .reconfigure_ok("serviceName=app&servicePath=/open&servicePath.1=/secure&denyHttp.1=true")
        .await;

    let plain = http_request(http_port(&proxy), "GET", "/secure", "app.example.test", &[]).await;
    assert_eq!(plain.status, 403, "{plain:?}");
    assert!(!plain.body.contains("app GET"), "{plain:?}");
    let open = http_request(http_port(&proxy), "GET", "/open", "app.example.test", &[]).await;
    assert_reached_app(&open, "GET", "/open");
    let tls = https_request(
        https_port(&proxy),
        &ca.root,
        "GET",
        "/secure",
        "app.example.test",
        &[],
    )
    .await;
    assert_reached_app(&tls, "GET", "/secure");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_domain_another_service_redirects_is_taken() {
    let proxy = TestProxy::spawn().await;
    proxy
        .reconfigure_ok(
            "serviceName=app&serviceDomain=new.example.test&redirectFromDomain=old.example.test",
        )
        .await;
    let before = proxy.snapshot().await;

    let (status, answer) = proxy
        .reconfigure("serviceName=rival&serviceDomain=old.example.test")
        .await;

    assert_eq!(status, StatusCode::CONFLICT, "{answer}");
    let message = answer["Message"].as_str().unwrap_or_default();
    assert!(
        message.contains("old.example.test") && message.contains("`app`"),
        "{message}"
    );
    proxy.assert_unchanged_since(&before).await;
}
