//! `GET /metrics`: Prometheus' text format, read after real changes and real requests through
//! HAProxy: changes by kind and outcome, reloads, validation failures, what is routed, HAProxy's
//! processes, HAProxy's own counters named by service, certificates' expiry; and who may read it.

use reqwest::StatusCode;

use crate::helpers::{
    answers_under_the_read_rules, proxy_routing_demo, spawn_backend, TestProxy, READ_RULES_TOKEN,
};
use crate::tls::put_cert;

/// The metrics text, asserting a 200 in the OpenMetrics content type.
pub async fn scrape(proxy: &TestProxy) -> String {
    let response = proxy
        .http()
        .get(proxy.api("/metrics"))
        .send()
        .await
        .expect("the API answers");
    assert_eq!(response.status(), StatusCode::OK);
    let content_type = response
        .headers()
        .get("content-type")
        .and_then(|value| value.to_str().ok())
        .unwrap_or_default()
        .to_string();
    assert!(
        content_type.starts_with("application/openmetrics-text"),
        "{content_type}"
    );
    response.text().await.expect("metrics text")
}

/// The value of the sample `name` whose labels include every one of `labels` (`key="value"`);
/// `None` when there is no such sample.
pub fn sample(text: &str, name: &str, labels: &[&str]) -> Option<f64> {
    text.lines()
        .filter(|line| !line.starts_with('#'))
        .find(|line| {
            let (series, _) = line.rsplit_once(' ').unwrap_or((line, ""));
            let (metric, label_text) = series.split_once('{').unwrap_or((series, ""));
            metric == name && labels.iter().all(|label| label_text.contains(label))
        })
        .and_then(|line| line.rsplit_once(' '))
        .and_then(|(_, value)| value.parse().ok())
}

pub fn value(text: &str, name: &str, labels: &[&str]) -> f64 {
    sample(text, name, labels).unwrap_or_else(|| panic!("no sample {name} {labels:?} in:\n{text}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changes_reloads_and_haproxy_counters_by_service_are_exported() {
    let (proxy, backend) = proxy_routing_demo().await;
    for _ in 0..5 {
        let (status, body) = proxy.get_through_proxy("/demo/hello", None).await;
        assert_eq!(
            (status, body.as_str()),
            (StatusCode::OK, "demo /demo/hello")
        );
    }
    // A pattern HAProxy's regex engine refuses: rejected by `haproxy -c`, nothing changes.
    let (status, body) = proxy
        .reconfigure("serviceName=broken&servicePath=.*(unclosed&pathType=path_reg")
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");

    let text = scrape(&proxy).await;
    assert_eq!(
        value(
            &text,
            "flow_proxy_changes_total",
            &[r#"kind="reconfigure""#, r#"outcome="reloaded""#]
        ),
        1.0
    );
    assert_eq!(
        value(
            &text,
            "flow_proxy_changes_total",
            &[r#"kind="reconfigure""#, r#"outcome="rejected""#]
        ),
        1.0
    );
    assert_eq!(
        value(&text, "flow_proxy_validation_failures_total", &[]),
        1.0
    );
    assert!(
        value(
            &text,
            "flow_proxy_haproxy_reloads_total",
            &[r#"result="ok""#]
        ) >= 1.0
    );
    assert!(
        value(
            &text,
            "flow_proxy_haproxy_reload_duration_seconds_count",
            &[]
        ) >= 1.0
    );
    assert_eq!(value(&text, "flow_proxy_services", &[]), 1.0);
    assert_eq!(value(&text, "flow_proxy_destinations", &[]), 1.0);
    assert_eq!(value(&text, "flow_proxy_instances", &[]), 1.0);
    assert!(value(&text, "flow_proxy_haproxy_processes", &[]) >= 1.0);
    assert_eq!(value(&text, "flow_proxy_haproxy_stats_up", &[]), 1.0);

    // HAProxy's own counters, labelled with the service.
    let service = r#"service="go-demo""#;
    assert_eq!(
        value(
            &text,
            "flow_proxy_haproxy_backend_http_responses_total",
            &[service, r#"code="2xx""#]
        ),
        5.0
    );
    assert_eq!(
        value(
            &text,
            "flow_proxy_haproxy_backend_sessions_total",
            &[service]
        ),
        5.0
    );
    let server = format!(r#"server="127.0.0.1_{}""#, backend.port);
    assert_eq!(
        value(
            &text,
            "flow_proxy_haproxy_server_http_responses_total",
            &[service, &server, r#"code="2xx""#]
        ),
        5.0
    );
    assert_eq!(
        value(&text, "flow_proxy_haproxy_server_up", &[service, &server]),
        1.0
    );
    // Only routed services' backends, never the refused one.
    assert!(!text.contains(r#"service="broken""#), "{text}");

    // A second instance shows up in the counts once the watch has routed it: a change of the
    // server slots, made without a reload, and HAProxy's counters name it.
    let second = spawn_backend("demo2").await;
    proxy
        .register_instance("go-demo", "go-demo.2", second.port)
        .await;
    let second_server = format!(r#"server="127.0.0.1_{}""#, second.port);
    crate::fleet::eventually(
        "the second instance is counted",
        std::time::Duration::from_secs(10),
        || async {
            let text = scrape(&proxy).await;
            sample(&text, "flow_proxy_instances", &[]) == Some(2.0)
                && sample(
                    &text,
                    "flow_proxy_changes_total",
                    &[r#"kind="instances""#, r#"outcome="applied_without_reload""#],
                )
                .is_some_and(|count| count >= 1.0)
                && sample(
                    &text,
                    "flow_proxy_haproxy_server_up",
                    &[service, &second_server],
                ) == Some(1.0)
        },
    )
    .await;

    // Removed: the counts go back to zero.
    let (status, answer) = proxy.remove("serviceName=go-demo").await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    let text = scrape(&proxy).await;
    assert_eq!(value(&text, "flow_proxy_services", &[]), 0.0);
    assert_eq!(value(&text, "flow_proxy_destinations", &[]), 0.0);
    assert_eq!(value(&text, "flow_proxy_instances", &[]), 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificates_are_exported_with_their_expiry_time() {
    let mut params =
        rcgen::CertificateParams::new(vec!["shop.example.test".to_string()]).expect("params");
    params.not_before = rcgen::date_time_ymd(2024, 1, 1);
    params.not_after = rcgen::date_time_ymd(2030, 6, 15);
    let key = rcgen::KeyPair::generate().expect("key");
    let certificate = params.self_signed(&key).expect("certificate");
    let proxy = TestProxy::spawn().await;
    let (status, answer) = put_cert(
        &proxy,
        "shop",
        &format!("{}{}", certificate.pem(), key.serialize_pem()),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    let text = scrape(&proxy).await;
    // 2030-06-15T00:00:00Z.
    assert_eq!(
        value(
            &text,
            "flow_proxy_certificate_expiry_timestamp_seconds",
            &[r#"certificate="shop""#]
        ),
        1_907_712_000.0
    );
    assert!(!text.contains("PRIVATE KEY"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_follow_the_read_endpoints_access_rules() {
    for answer in answers_under_the_read_rules("/metrics").await {
        let text = answer.text().await.expect("text");
        assert!(text.contains("flow_proxy_services"), "{text}");
        assert!(!text.contains(READ_RULES_TOKEN), "{text}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registry_errors_are_counted_while_consul_is_down() {
    let mut registry = crate::fleet::SharedRegistry::start().await;
    let address = registry.address();
    let proxy = TestProxy::spawn_with(|settings| settings.consul_address = vec![address]).await;
    let text = scrape(&proxy).await;
    assert_eq!(value(&text, "flow_proxy_registry_errors_total", &[]), 0.0);
    registry.stop().await;
    crate::fleet::eventually(
        "the watches' failed queries are counted",
        std::time::Duration::from_secs(10),
        || async {
            sample(
                &scrape(&proxy).await,
                "flow_proxy_registry_errors_total",
                &[],
            )
            .is_some_and(|errors| errors >= 1.0)
        },
    )
    .await;
    // A change that needs the registry fails, and is counted as failed.
    let (status, body) = proxy.reconfigure("serviceName=web&servicePath=/web").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    let text = scrape(&proxy).await;
    assert_eq!(
        value(
            &text,
            "flow_proxy_changes_total",
            &[r#"kind="reconfigure""#, r#"outcome="failed""#]
        ),
        1.0
    );
}
