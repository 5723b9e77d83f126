//! Custom fragments (`templateFePath`, `templateBePath` under `--templates-dir`) and raw backend
//! lines (`backendExtra`, only with `--allow-backend-extra`), as a user sees them: a header a
//! client receives, a path that reaches the service, HAProxy's own message when a fragment
//! breaks the config, and a 400 naming the parameter (with nothing changed) for every refusal.

use reqwest::StatusCode;

use crate::helpers::{spawn_backend, Backend, TestProxy};

/// A backend fragment written instead of the shipped one: the same backend, plus a header
/// naming the service.
const HEADER_BACKEND: &str = "\
backend {{name}}
    mode {{mode}}
    http-response set-header X-Custom-Backend {{service}}-v1
{{#each servers}}
    server {{name}} {{address}}{{#if check}} check{{/if}}
{{/each}}
";

/// A frontend fragment routing `/custom…` (instead of the service's `servicePath`).
const CUSTOM_PATH_FRONTEND: &str = "\
    acl custom_{{backend}} path_beg /custom
    use_backend {{backend}} if custom_{{backend}}
";

/// A proxy with `--templates-dir` set to a new directory holding `files`, and `app` (one
/// instance) registered.
async fn proxy_with_templates(files: &[(&str, &str)]) -> (TestProxy, tempfile::TempDir, Backend) {
    let templates = tempfile::tempdir().expect("templates directory");
    for (name, text) in files {
        std::fs::write(templates.path().join(name), text).expect("write template");
    }
    let dir = templates.path().to_path_buf();
    let proxy = TestProxy::spawn_with(|settings| settings.templates_dir = Some(dir)).await;
    let backend = spawn_backend("app").await;
    proxy.register_instance("app", "app-1", backend.port).await;
    (proxy, templates, backend)
}

/// `GET <path>` through HAProxy: status, the value of `header` (if any) and the body.
async fn get_with_header(
    proxy: &TestProxy,
    path: &str,
    header: &str,
) -> (StatusCode, Option<String>, String) {
    let response = proxy
        .http()
        .get(format!(
            "http://127.0.0.1:{}{path}",
            proxy.settings().http_port
        ))
        .send()
        .await
        .unwrap_or_else(|error| panic!("HAProxy answers GET {path}: {error}"));
    let status = response.status();
    let value = response
        .headers()
        .get(header)
        .map(|value| value.to_str().expect("ASCII header").to_string());
    (status, value, response.text().await.expect("body"))
}

/// Asserts a 400 whose message names `parameter` and contains `words`.
fn assert_refused(status: StatusCode, body: &serde_json::Value, parameter: &str, words: &str) {
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    let message = body["Message"].as_str().expect("a message");
    assert!(
        message.contains(&format!("`{parameter}`")) && message.contains(words),
        "the message names `{parameter}` and says {words:?}: {message}"
    );
}

#[tokio::test]
async fn a_custom_backend_fragment_adds_a_header_the_client_sees_and_is_reread_on_reload() {
    let (proxy, templates, _backend) = proxy_with_templates(&[("be.hbs", HEADER_BACKEND)]).await;
    proxy
        .reconfigure_ok("serviceName=app&servicePath=/app&templateBePath=be.hbs")
        .await;

    let (status, header, body) = get_with_header(&proxy, "/app/x", "x-custom-backend").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body, "app /app/x");
    assert_eq!(header.as_deref(), Some("app-v1"));

    // An edit on disk applies at the next render: here a /reload.
    std::fs::write(
        templates.path().join("be.hbs"),
        HEADER_BACKEND.replace("-v1", "-v2"),
    )
    .expect("edit template");
    let (status, answer) = proxy.api_get("/v1/docker-flow-proxy/reload").await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    let (status, header, _) = get_with_header(&proxy, "/app/x", "x-custom-backend").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(header.as_deref(), Some("app-v2"));
}

#[tokio::test]
async fn a_custom_frontend_fragment_routes_its_own_path_to_the_service() {
    let (proxy, _templates, _backend) =
        proxy_with_templates(&[("fe.hbs", CUSTOM_PATH_FRONTEND)]).await;
    proxy
        .reconfigure_ok("serviceName=app&servicePath=/app&templateFePath=fe.hbs")
        .await;

    let (status, body) = proxy.get_through_proxy("/custom/page", None).await;
    assert_eq!(
        (status, body.as_str()),
        (StatusCode::OK, "app /custom/page")
    );
    // The fragment replaced the shipped rule: the servicePath alone routes nothing.
    let (status, _) = proxy.get_through_proxy("/app", None).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
}

#[tokio::test]
async fn a_fragment_haproxy_rejects_gets_its_message_and_the_earlier_routes_still_answer() {
    let broken = "backend {{name}}\n    mode {{mode}}\n    no-such-keyword here\n";
    let (proxy, _templates, _backend) = proxy_with_templates(&[
        ("broken.hbs", broken),
        (
            "unknown-value.hbs",
            "backend {{name}}\n    {{no_such_value}}\n",
        ),
    ])
    .await;
    proxy
        .reconfigure_ok("serviceName=app&servicePath=/app")
        .await;
    let before = proxy.snapshot().await;

    let (status, body) = proxy
        .reconfigure("serviceName=app&servicePath=/app&templateBePath=broken.hbs")
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    let message = body["Message"].as_str().expect("a message");
    assert!(
        message.contains("HAProxy rejected") && message.contains("no-such-keyword"),
        "HAProxy's own message comes back: {message}"
    );

    let (status, body) = proxy
        .reconfigure("serviceName=app&servicePath=/app&templateBePath=unknown-value.hbs")
        .await;
    assert_refused(status, &body, "templateBePath", "no_such_value");

    proxy.assert_unchanged_since(&before).await;
    let (status, body) = proxy.get_through_proxy("/app/still", None).await;
    assert_eq!((status, body.as_str()), (StatusCode::OK, "app /app/still"));
}

#[tokio::test]
async fn template_paths_outside_the_directory_or_missing_are_refused_and_change_nothing() {
    let outside = tempfile::tempdir().expect("a directory outside");
    std::fs::write(outside.path().join("secret.hbs"), HEADER_BACKEND).expect("outside file");
    let (proxy, templates, _backend) = proxy_with_templates(&[("be.hbs", HEADER_BACKEND)]).await;
    std::os::unix::fs::symlink(
        outside.path().join("secret.hbs"),
        templates.path().join("escape.hbs"),
    )
    .expect("symlink");
    proxy
        .reconfigure_ok("serviceName=app&servicePath=/app")
        .await;
    let before = proxy.snapshot().await;

    for (parameter, value, words) in [
        ("templateBePath", "../be.hbs", "`..`"),
        ("templateFePath", "sub/../../x.hbs", "`..`"),
        ("templateBePath", "/etc/passwd", "absolute"),
        ("templateBePath", "%2Fetc%2Fpasswd", "absolute"),
        ("templateBePath", "escape.hbs", "outside --templates-dir"),
        ("templateFePath", "missing.hbs", "does not exist"),
    ] {
        let (status, body) = proxy
            .reconfigure(&format!(
                "serviceName=app&servicePath=/app&{parameter}={value}"
            ))
            .await;
        assert_refused(status, &body, parameter, words);
    }
    proxy.assert_unchanged_since(&before).await;
}

#[tokio::test]
async fn custom_templates_without_templates_dir_are_refused_naming_the_flag() {
    let proxy = TestProxy::spawn().await;
    let (status, body) = proxy
        .reconfigure("serviceName=app&servicePath=/app&templateFePath=fe.hbs")
        .await;
    assert_refused(status, &body, "templateFePath", "--templates-dir");
}

/// A proxy started with `--allow-backend-extra`, routing `app`.
async fn proxy_allowing_backend_extra() -> (TestProxy, Backend) {
    let proxy = TestProxy::spawn_with(|settings| settings.allow_backend_extra = true).await;
    let backend = spawn_backend("app").await;
    proxy.register_instance("app", "app-1", backend.port).await;
    (proxy, backend)
}

#[tokio::test]
async fn backend_extra_lines_reach_haproxy_when_the_operator_allows_them() {
    let (proxy, _backend) = proxy_allowing_backend_extra().await;
    // Two lines, separated by a newline (%0A); surrounding blanks and blank lines are dropped.
    proxy
        .reconfigure_ok(
            "serviceName=app&servicePath=/app&backendExtra=http-response%20set-header%20X-Extra%20yes\
             %0A%0A%20%20http-response%20set-header%20X-Second%20line%0D%0A",
        )
        .await;
    let (status, extra, body) = get_with_header(&proxy, "/app", "x-extra").await;
    assert_eq!((status, body.as_str()), (StatusCode::OK, "app /app"));
    assert_eq!(extra.as_deref(), Some("yes"));
    let (_, second, _) = get_with_header(&proxy, "/app", "x-second").await;
    assert_eq!(second.as_deref(), Some("line"));

    let stored = proxy.stored_spec("app").await.expect("stored");
    assert_eq!(
        stored["BackendExtra"],
        serde_json::json!([
            "http-response set-header X-Extra yes",
            "http-response set-header X-Second line"
        ])
    );
}

#[tokio::test]
async fn backend_extra_is_refused_unless_allowed_and_bad_lines_never_reach_haproxy() {
    let proxy = TestProxy::spawn().await;
    let (status, body) = proxy
        .reconfigure(
            "serviceName=app&servicePath=/app&backendExtra=http-response%20set-header%20X-Extra%20yes",
        )
        .await;
    assert_refused(status, &body, "backendExtra", "--allow-backend-extra");

    let (proxy, _backend) = proxy_allowing_backend_extra().await;
    proxy
        .reconfigure_ok("serviceName=app&servicePath=/app")
        .await;
    let before = proxy.snapshot().await;
    for (value, words) in [
        ("frontend%20evil", "backend keyword"),
        (
            "http-response%20set-header%20X%20yes%0Afrontend%20evil%0A%20bind%20:81",
            "backend keyword",
        ),
        ("http-response%20set-header%20X%20yes%20%23comment", "'#'"),
        (
            "http-response%20set-header%20X%20%22%24%7BHOME%7D%22",
            "'$'",
        ),
        (
            "http-response%20set-header%20X%20%25%5Benv(HOME)%5D",
            "env()",
        ),
        ("http-response%20set-header%20X%20%7B%7Bname%7D%7D", "{{"),
        (
            "http-request%20return%20status%20200%20file%20/etc/passwd",
            "`file`",
        ),
    ] {
        let (status, body) = proxy
            .reconfigure(&format!(
                "serviceName=app&servicePath=/app&backendExtra={value}"
            ))
            .await;
        assert_refused(status, &body, "backendExtra", words);
    }

    // A well-formed line HAProxy does not accept: its own message, nothing changed.
    let (status, body) = proxy
        .reconfigure("serviceName=app&servicePath=/app&backendExtra=timeout%20server%20soon")
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    let message = body["Message"].as_str().expect("a message");
    assert!(message.contains("HAProxy rejected"), "{message}");
    proxy.assert_unchanged_since(&before).await;
    let (status, body) = proxy.get_through_proxy("/app", None).await;
    assert_eq!((status, body.as_str()), (StatusCode::OK, "app /app"));
}

#[tokio::test]
async fn a_fragment_removed_from_disk_stops_changes_with_a_clear_error_until_it_is_back() {
    let (proxy, templates, _backend) = proxy_with_templates(&[("be.hbs", HEADER_BACKEND)]).await;
    proxy
        .reconfigure_ok("serviceName=app&servicePath=/app&templateBePath=be.hbs")
        .await;
    let before = proxy.snapshot().await;
    std::fs::remove_file(templates.path().join("be.hbs")).expect("remove template");

    // Another service's change renders the whole config, `app`'s fragment included: refused
    // as the proxy's problem (500), naming the service and the file; HAProxy keeps serving.
    let other = spawn_backend("other").await;
    proxy
        .register_instance("other", "other-1", other.port)
        .await;
    let (status, body) = proxy
        .reconfigure("serviceName=other&servicePath=/other")
        .await;
    assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR, "{body}");
    let message = body["Message"].as_str().expect("a message");
    assert!(
        message.contains("service `app`")
            && message.contains("`templateBePath`")
            && message.contains("be.hbs"),
        "{message}"
    );
    proxy.assert_unchanged_since(&before).await;
    let (status, header, _) = get_with_header(&proxy, "/app", "x-custom-backend").await;
    assert_eq!(
        (status, header.as_deref()),
        (StatusCode::OK, Some("app-v1"))
    );

    std::fs::write(templates.path().join("be.hbs"), HEADER_BACKEND).expect("restore template");
    proxy
        .reconfigure_ok("serviceName=other&servicePath=/other")
        .await;
    let (status, body) = proxy.get_through_proxy("/other", None).await;
    assert_eq!((status, body.as_str()), (StatusCode::OK, "other /other"));
}
