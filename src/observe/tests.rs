use std::time::Duration;

use super::haproxy_stats::{self, StatRow};
use super::status::StatusPage;
use super::*;
use crate::spec::ServiceSpec;

/// `show stat` as HAProxy 2.6 answers it, cut to the columns flow-proxy reads (the parser goes
/// by the header, so the other columns do not matter).
const SHOW_STAT: &str = "# pxname,svname,scur,stot,bin,bout,chkfail,status,hrsp_1xx,hrsp_2xx,hrsp_3xx,hrsp_4xx,hrsp_5xx,hrsp_other,check_status,addr,\n\
http-in,FRONTEND,0,9,900,1800,,OPEN,0,7,0,2,0,0,,,\n\
shop-be0,s1,1,4,400,800,0,UP,0,4,0,0,0,0,L4OK,10.0.0.1:8080,\n\
shop-be0,s2,0,0,0,0,3,DOWN,0,0,0,0,0,0,L4CON,10.0.0.2:8080,\n\
shop-be0,s3,0,0,0,0,0,MAINT,0,0,0,0,0,0,,127.0.0.1:1,\n\
shop-be0,BACKEND,1,4,400,800,,UP,0,4,0,0,0,0,,,\n\
stats,BACKEND,0,0,0,0,,UP,0,0,0,0,0,0,,,\n";

fn spec(query: &str) -> ServiceSpec {
    let pairs: Vec<(String, String)> = serde_urlencoded::from_str(query).expect("query");
    ServiceSpec::from_query(&pairs).expect("valid spec")
}

/// What [`shop`] counts: one service, one destination, two instances.
const SHOP_TOTALS: ServiceTotals = ServiceTotals {
    services: 1,
    destinations: 1,
    instances: 2,
};

fn shop() -> RoutedService {
    RoutedService {
        spec: spec(
            "serviceName=shop&servicePath=/shop&serviceDomain=shop.example.test&serviceColor=blue",
        )
        .into(),
        instances: vec![
            Instance::new("10.0.0.1", 8080).expect("instance"),
            Instance::new("10.0.0.2", 8080).expect("instance"),
        ]
        .into(),
        pool_backends: Default::default(),
    }
}

fn rows() -> Vec<StatRow> {
    haproxy_stats::parse(SHOW_STAT).expect("show stat parses")
}

#[test]
fn show_stat_is_read_by_its_header() {
    let rows = rows();
    assert_eq!(rows.len(), 6);
    let down = &rows[2];
    assert_eq!(
        (down.proxy.as_str(), down.server.as_str()),
        ("shop-be0", "s2")
    );
    assert!(down.is_server());
    assert_eq!(down.field("status"), Some("DOWN"));
    assert_eq!(down.field("chkfail"), Some("3"));
    assert_eq!(rows[0].field("chkfail"), None, "empty fields are absent");
    assert!(!rows[4].is_server());
}

#[test]
fn haproxy_counters_are_exported_for_routed_backends_only_and_labelled_with_the_service() {
    let observer = Observer::new();
    observer.publish_services(Arc::new(vec![shop()]), SHOP_TOTALS);
    let text = observer.metrics_text(2, Some(&rows())).expect("encodes");
    for line in [
        "flow_proxy_haproxy_backend_http_responses_total{service=\"shop\",backend=\"shop-be0\",code=\"2xx\"} 4",
        "flow_proxy_haproxy_backend_sessions_total{service=\"shop\",backend=\"shop-be0\"} 4",
        "flow_proxy_haproxy_server_up{service=\"shop\",backend=\"shop-be0\",server=\"10.0.0.2_8080\"} 0",
        "flow_proxy_haproxy_server_up{service=\"shop\",backend=\"shop-be0\",server=\"10.0.0.1_8080\"} 1",
        "flow_proxy_haproxy_server_check_failures_total{service=\"shop\",backend=\"shop-be0\",server=\"10.0.0.2_8080\"} 3",
        "flow_proxy_haproxy_processes 2",
        "flow_proxy_haproxy_stats_up 1",
        "flow_proxy_services 1",
        "flow_proxy_instances 2",
    ] {
        assert!(text.contains(line), "missing `{line}` in:\n{text}");
    }
    assert!(
        !text.contains("http-in") && !text.contains("backend=\"stats\""),
        "{text}"
    );
    assert!(
        !text.contains("server=\"s3\"") && !text.contains("127.0.0.1_1"),
        "a spare slot is no instance: {text}"
    );
    assert!(text.ends_with("# EOF\n"));
}

#[test]
fn without_the_stats_socket_the_metrics_say_so() {
    let text = Observer::new().metrics_text(0, None).expect("encodes");
    assert!(text.contains("flow_proxy_haproxy_stats_up 0"), "{text}");
    assert!(
        !text.contains("flow_proxy_haproxy_backend_sessions"),
        "{text}"
    );
}

fn change(outcome: ChangeOutcome) -> ChangeRecord {
    ChangeRecord {
        kind: ChangeKind::Reconfigure,
        service: Some("shop".into()),
        before: RouteSet::default(),
        after: RouteSet::of(&shop().spec, &shop().instances),
        validate: Some(Duration::from_millis(40)),
        reload: Some(Duration::from_millis(60)),
        total: Duration::from_millis(120),
        outcome,
    }
}

#[test]
fn changes_are_counted_by_kind_and_outcome_and_the_last_error_is_kept() {
    let observer = Observer::new();
    observer.record_change(change(ChangeOutcome::Reloaded));
    observer.record_change(change(ChangeOutcome::WithoutReload));
    observer.record_change(change(ChangeOutcome::Rejected("no".into())));
    observer.record_validation(Duration::from_millis(30), false);
    observer.record_reload(Duration::from_millis(70), None);
    observer.record_watch_restart(WatchKind::Instances);
    observer.record_registry_error();
    let text = observer.metrics_text(1, None).expect("encodes");
    for line in [
        "flow_proxy_changes_total{kind=\"reconfigure\",outcome=\"reloaded\"} 1",
        "flow_proxy_changes_total{kind=\"reconfigure\",outcome=\"applied_without_reload\"} 1",
        "flow_proxy_changes_total{kind=\"reconfigure\",outcome=\"rejected\"} 1",
        "flow_proxy_changes_without_reload_total 1",
        "flow_proxy_validation_failures_total 1",
        "flow_proxy_haproxy_reloads_total{result=\"ok\"} 1",
        "flow_proxy_watch_restarts_total{watch=\"instances\"} 1",
        "flow_proxy_registry_errors_total 1",
    ] {
        assert!(text.contains(line), "missing `{line}` in:\n{text}");
    }
    let status = observer.status();
    let error = status.last_error.as_ref().expect("kept");
    assert_eq!(
        (error.subject.as_str(), error.message.as_str()),
        ("shop", "no")
    );
    assert_eq!(status.recent.len(), 3);
}

#[test]
fn route_sets_name_paths_domains_and_instances() {
    let shop = shop();
    let set = RouteSet::of(&shop.spec, &shop.instances);
    assert_eq!(
        set.routes.iter().map(String::as_str).collect::<Vec<_>>(),
        ["domain:shop.example.test", "path:/shop"]
    );
    assert_eq!(
        set.instances.iter().map(String::as_str).collect::<Vec<_>>(),
        ["10.0.0.1:8080", "10.0.0.2:8080"]
    );
    let v6 = Instance::new("::1", 80).expect("instance");
    assert_eq!(instance_address(&v6), "[::1]:80");
}

#[test]
fn the_status_page_shows_health_from_haproxy_and_escapes_every_value() {
    let observer = Observer::new();
    observer.publish_services(Arc::new(vec![shop()]), SHOP_TOTALS);
    observer.record_reload(Duration::from_millis(42), None);
    observer.record_error("shop", "<script>alert(1)</script> & \"quoted\"".into());
    let page = StatusPage::new().expect("template compiles");
    let html = page.render(&observer, Some(&rows())).expect("renders");
    assert!(
        html.contains("10.0.0.1:8080 <span class=\"ok\">UP</span>"),
        "{html}"
    );
    assert!(
        html.contains("10.0.0.2:8080 <span class=\"bad\">DOWN</span>"),
        "{html}"
    );
    assert!(html.contains("<td>blue</td>"), "{html}");
    assert!(html.contains("42.0 ms"), "{html}");
    assert!(!html.contains("<script>"), "{html}");
    assert!(
        html.contains("&lt;script&gt;alert(1)&lt;/script&gt; &amp; &quot;quoted&quot;"),
        "{html}"
    );

    let unknown = page.render(&observer, None).expect("renders");
    assert!(unknown.contains("stats socket did not answer"), "{unknown}");
}
