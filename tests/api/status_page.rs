//! The status page `GET /`, loaded in headless Chromium as a person would: the routed services
//! with their paths, domains, color and instances with HAProxy's view of their health, the
//! certificates, the last reload and the last error; a screenshot is taken (kept in the test's
//! temporary directory, out of the repository). It follows the read endpoints' access rules.

use std::path::{Path, PathBuf};
use std::time::Duration;

use reqwest::StatusCode;

use crate::fleet::eventually;
use crate::helpers::{
    answers_under_the_read_rules, free_port, spawn_backend, TestProxy, READ_RULES_TOKEN,
};
use crate::tls::put_cert;

/// How long Chromium may take to load and dump the page.
const CHROMIUM_TIMEOUT: Duration = Duration::from_secs(90);

/// The Chromium binary, or a failure saying how to install it.
fn chromium() -> PathBuf {
    for candidate in ["chromium", "chromium-browser"] {
        let found = std::process::Command::new(candidate)
            .arg("--version")
            .output();
        if matches!(found, Ok(ref output) if output.status.success()) {
            return PathBuf::from(candidate);
        }
    }
    panic!(
        "Chromium is not installed: the status page is tested in headless Chromium. Run \
         scripts/install-chromium.sh (or scripts/test.sh, which calls it), or `apt-get install \
         chromium`."
    );
}

/// Runs headless Chromium on `url` with `flags`, its profile in `profile`; returns its stdout.
async fn headless(url: &str, profile: &Path, flags: &[String]) -> String {
    let mut command = tokio::process::Command::new(chromium());
    command
        .args([
            "--headless",
            // CI runs as root, where Chromium's sandbox cannot start.
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--no-first-run",
            "--window-size=1280,1000",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .args(flags)
        .arg(url)
        .kill_on_drop(true)
        .stdin(std::process::Stdio::null());
    let output = tokio::time::timeout(CHROMIUM_TIMEOUT, command.output())
        .await
        .expect("Chromium finishes within its time")
        .expect("Chromium runs");
    assert!(
        output.status.success(),
        "Chromium failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// The status page `GET /` as served (no browser), without its tags.
pub async fn status_page_text(proxy: &TestProxy) -> String {
    let page = proxy
        .http()
        .get(proxy.api("/"))
        .send()
        .await
        .expect("the API answers");
    visible_text(&page.text().await.unwrap_or_default())
}

/// The text a person reads on the page: the DOM Chromium built, without its tags.
pub fn visible_text(dom: &str) -> String {
    let mut text = String::new();
    let mut in_tag = false;
    let mut in_style = false;
    let lower = dom.to_ascii_lowercase();
    let mut position = 0;
    for character in dom.chars() {
        if lower[position..].starts_with("<style") {
            in_style = true;
        }
        if lower[position..].starts_with("</style") {
            in_style = false;
        }
        match character {
            '<' => in_tag = true,
            '>' => {
                in_tag = false;
                text.push(' ');
            }
            _ if !in_tag && !in_style => text.push(character),
            _ => {}
        }
        position += character.len_utf8();
    }
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_person_sees_services_instances_health_certificates_and_the_last_reload() {
    let chromium_check = chromium();
    assert!(!chromium_check.as_os_str().is_empty());
    let proxy = TestProxy::spawn().await;
    let live = spawn_backend("shop").await;
    proxy
        .register_instance("shop-blue", "shop.1", live.port)
        .await;
    // An instance nobody answers on: HAProxy's health check marks it DOWN.
    let dead_port = free_port();
    proxy
        .register_instance("shop-blue", "shop.2", dead_port)
        .await;
    proxy
        .reconfigure_ok(
            "serviceName=shop&serviceColor=blue&servicePath=/shop&serviceDomain=shop.example.test",
        )
        .await;
    let backend = spawn_backend("docs").await;
    proxy
        .register_instance("docs", "docs.1", backend.port)
        .await;
    proxy
        .reconfigure_ok("serviceName=docs&servicePath=/docs")
        .await;
    let mut params =
        rcgen::CertificateParams::new(vec!["shop.example.test".to_string()]).expect("params");
    params.not_after = rcgen::date_time_ymd(2030, 6, 15);
    let key = rcgen::KeyPair::generate().expect("key");
    let certificate = params.self_signed(&key).expect("certificate");
    let (status, answer) = put_cert(
        &proxy,
        "shop",
        &format!("{}{}", certificate.pem(), key.serialize_pem()),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    // A change HAProxy refuses becomes the last error.
    let (status, body) = proxy
        .reconfigure("serviceName=broken&servicePath=.*(unclosed&pathType=path_reg")
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");

    let dead = format!("127.0.0.1:{dead_port} DOWN");
    eventually(
        "HAProxy's checks mark the dead instance DOWN",
        Duration::from_secs(20),
        || async { status_page_text(&proxy).await.contains(&dead) },
    )
    .await;

    let scratch = tempfile::tempdir().expect("tempdir");
    let url = proxy.api("/");
    let dom = headless(
        &url,
        &scratch.path().join("profile"),
        &["--dump-dom".into()],
    )
    .await;
    let text = visible_text(&dom);
    for seen in [
        "flow-proxy status",
        "Services (2)",
        "docs",
        "/docs",
        &format!("127.0.0.1:{} UP", backend.port),
        "shop",
        "blue",
        "/shop",
        "shop.example.test",
        &format!("127.0.0.1:{} UP", live.port),
        &dead,
        "Certificates (1)",
        "2030-06-15",
        "Last reload:",
        " ms, ok",
        "broken: HAProxy rejected the configuration",
    ] {
        assert!(text.contains(seen), "the page shows `{seen}`:\n{text}");
    }
    assert!(
        !dom.contains("PRIVATE KEY") && !dom.contains("<script"),
        "{dom}"
    );

    let screenshot = scratch.path().join("status.png");
    headless(
        &url,
        &scratch.path().join("profile"),
        &[format!("--screenshot={}", screenshot.display())],
    )
    .await;
    let png = std::fs::read(&screenshot).expect("Chromium wrote the screenshot");
    assert!(
        png.starts_with(b"\x89PNG") && png.len() > 10_000,
        "a real screenshot"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_status_page_follows_the_read_endpoints_access_rules() {
    for page in answers_under_the_read_rules("/").await {
        assert!(page
            .headers()
            .get("content-type")
            .and_then(|value| value.to_str().ok())
            .is_some_and(|value| value.starts_with("text/html")));
        let body = page.text().await.expect("page");
        assert!(body.contains("No service is routed."), "{body}");
        assert!(!body.contains(READ_RULES_TOKEN), "{body}");
    }
}
