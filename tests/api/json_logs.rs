//! `--log-format json`: the real binary writes one JSON object per log line, and one line per
//! change with the service, what changed in its routes and instances, the validate and reload
//! times and the outcome.

use std::time::Duration;

use reqwest::StatusCode;
use serde_json::Value;

use crate::fleet::{eventually, ProxyProcess, SharedRegistry};
use crate::helpers::spawn_backend;

/// The JSON lines of the process's log (HAProxy's own stderr, which it shares, is not JSON).
fn json_lines(log: &str) -> Vec<Value> {
    log.lines()
        .filter(|line| line.starts_with('{'))
        .map(|line| {
            serde_json::from_str(line).unwrap_or_else(|error| panic!("{error}: not JSON: {line}"))
        })
        .collect()
}

/// The change lines (target `flow_proxy::change`) about `service` of kind `change`.
fn change_lines(log: &str, service: &str, change: &str) -> Vec<Value> {
    json_lines(log)
        .into_iter()
        .filter(|line| {
            line["target"] == "flow_proxy::change"
                && line["service"] == service
                && line["change"] == change
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_change_is_one_json_line_with_what_changed_its_timings_and_outcome() {
    let registry = SharedRegistry::start().await;
    let mut proxy = ProxyProcess::start(&registry.address(), &["--log-format", "json"]).await;
    let first = spawn_backend("web-1").await;
    registry.register_instance("web", "web.1", first.port).await;
    proxy
        .reconfigure_ok("serviceName=web&servicePath=/web")
        .await;
    assert_eq!(
        proxy.get_through_proxy("/web", None).await,
        (StatusCode::OK, "web-1 /web".to_string())
    );

    let log = proxy.log();
    let every = json_lines(&log);
    assert!(
        every
            .iter()
            .any(|line| line["message"] == "flow-proxy API listening"),
        "the start line is JSON too:\n{log}"
    );
    assert!(
        every
            .iter()
            .all(|line| line["level"].is_string() && line["timestamp"].is_string()),
        "{log}"
    );
    let lines = change_lines(&log, "web", "reconfigure");
    assert_eq!(lines.len(), 1, "one line for one change:\n{log}");
    let line = &lines[0];
    assert_eq!(line["outcome"], "reloaded", "{line}");
    assert_eq!(line["routes_added"], "path:/web", "{line}");
    assert_eq!(line["routes_removed"], "", "{line}");
    assert_eq!(
        line["instances_added"],
        format!("127.0.0.1:{}", first.port),
        "{line}"
    );
    assert!(
        line["validate_ms"].as_f64().is_some_and(|ms| ms > 0.0),
        "{line}"
    );
    assert!(
        line["reload_ms"].as_f64().is_some_and(|ms| ms > 0.0),
        "{line}"
    );

    // A new instance seen by the watch: one line naming it, applied to the server slots over
    // the Runtime API (no reload).
    let second = spawn_backend("web-2").await;
    registry
        .register_instance("web", "web.2", second.port)
        .await;
    let added = format!("127.0.0.1:{}", second.port);
    eventually(
        "the instance change is logged",
        Duration::from_secs(10),
        || {
            let log = proxy.log();
            let added = added.clone();
            async move {
                change_lines(&log, "web", "instances").iter().any(|line| {
                    line["instances_added"] == added && line["outcome"] == "applied_without_reload"
                })
            }
        },
    )
    .await;

    // A change HAProxy refuses: its line says so, with HAProxy's reason.
    let (status, body) = proxy
        .reconfigure("serviceName=web&servicePath=.*(unclosed&pathType=path_reg")
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    let rejected = change_lines(&proxy.log(), "web", "reconfigure");
    let rejected = rejected.last().expect("a line for the refused change");
    assert_eq!(rejected["outcome"], "rejected", "{rejected}");
    assert_eq!(rejected["level"], "WARN", "{rejected}");
    assert!(
        rejected["error"]
            .as_str()
            .is_some_and(|error| error.contains("HAProxy rejected")),
        "{rejected}"
    );

    let (status, body) = proxy.remove("serviceName=web").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let removed = change_lines(&proxy.log(), "web", "remove");
    assert_eq!(removed.len(), 1, "{}", proxy.log());
    assert_eq!(removed[0]["routes_removed"], "path:/web");
    assert_eq!(removed[0]["routes_added"], "");
    assert_eq!(removed[0]["outcome"], "reloaded");
    proxy.stop().await;
}
