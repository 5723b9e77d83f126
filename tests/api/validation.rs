//! Bad input gets a clear error and changes nothing: neither haproxy.cfg, nor HAProxy, nor KV.

use reqwest::StatusCode;

use crate::helpers::{proxy_routing_demo, spawn_backend, TestProxy};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_parameter_is_refused_with_its_name_and_changes_nothing() {
    let (proxy, _backend) = proxy_routing_demo().await;
    let before = proxy.snapshot().await;

    let cases = [
        ("servicePath=/demo", "serviceName"),
        (
            "serviceName=go-demo&servicePath=/demo%0Abackend%20evil",
            "servicePath",
        ),
        ("serviceName=go-demo&servicePath=/a%20b", "servicePath"),
        ("serviceName=go-demo&servicePath=/a%23b", "servicePath"),
        ("serviceName=go-demo&servicePath=/a%22b", "servicePath"),
        ("serviceName=go-demo&servicePath=/a%27b", "servicePath"),
        ("serviceName=go%0Ademo&servicePath=/demo", "serviceName"),
        (
            "serviceName=go-demo&serviceDomain=evil.com%20if%20TRUE",
            "serviceDomain",
        ),
        ("serviceName=go-demo&servicePath=/demo&port=70000", "port"),
        (
            "serviceName=go-demo&servicePath=/demo&pathType=path_beg%20-i",
            "pathType",
        ),
        ("serviceName=go-demo&servicePath.1=/x%0D", "servicePath.1"),
        (
            "serviceName=go-demo&servicePath=/demo&serviceColor=bl%23ue",
            "serviceColor",
        ),
        ("serviceName=go-demo&reqMode=tcp", "srcPort"),
    ];
    for (query, parameter) in cases {
        let (status, answer) = proxy.reconfigure(query).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{query}: {answer}");
        assert_eq!(answer["Status"], "NOK", "{query}");
        let message = answer["Message"].as_str().unwrap_or_default();
        assert!(
            message.contains(parameter),
            "{query}: the message names `{parameter}`: {message}"
        );
    }

    proxy.assert_unchanged_since(&before).await;
    assert_eq!(proxy.names_answering("/demo", None, 1).await, ["demo"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_config_haproxy_rejects_leaves_the_running_proxy_and_kv_unchanged() {
    let (proxy, _backend) = proxy_routing_demo().await;
    let before = proxy.snapshot().await;

    // A well-formed value that HAProxy itself refuses: a regular expression that does not compile.
    let (status, answer) = proxy
        .reconfigure("serviceName=go-demo&servicePath=/demo[&pathType=path_reg")
        .await;

    assert_eq!(status, StatusCode::BAD_REQUEST, "{answer}");
    let message = answer["Message"].as_str().unwrap_or_default();
    assert!(
        message.contains("[ALERT]"),
        "HAProxy's own lines reach the caller: {message}"
    );
    proxy.assert_unchanged_since(&before).await;
    assert_eq!(proxy.names_answering("/demo/x", None, 1).await, ["demo"]);
    let stored = proxy
        .stored_spec("go-demo")
        .await
        .expect("go-demo is stored");
    assert_eq!(
        stored["PathType"], "path_beg",
        "KV keeps the old spec: {stored}"
    );
    let (_, services) = proxy.api_get("/services").await;
    assert_eq!(
        services[0]["PathType"], "path_beg",
        "the routed spec is the old one: {services}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_registry_answers_503_and_changes_nothing() {
    let closed_port = crate::helpers::free_port();
    let proxy = TestProxy::spawn_with(|settings| {
        settings.consul_address = vec![format!("127.0.0.1:{closed_port}")];
    })
    .await;
    let before = proxy.snapshot().await;

    let (status, answer) = proxy
        .reconfigure("serviceName=go-demo&servicePath=/demo")
        .await;

    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{answer}");
    let message = answer["Message"].as_str().unwrap_or_default();
    assert!(message.contains("unreachable"), "{message}");
    proxy.assert_unchanged_since(&before).await;
    let (status, _) = proxy.get_through_proxy("/demo", None).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_port_another_program_holds_answers_409_and_changes_nothing() {
    let (proxy, _backend) = proxy_routing_demo().await;
    let echo = spawn_backend("db").await;
    proxy.register_instance("db", "db.1", echo.port).await;
    // Another program holds the port: `haproxy -c` accepts the config, but a reload could not
    // bind it, so flow-proxy refuses the change before reloading (see haproxy_faults.rs).
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind a port");
    let taken_port = taken.local_addr().expect("address").port();
    let before = proxy.snapshot().await;

    let (status, answer) = proxy
        .reconfigure(&format!("serviceName=db&reqMode=tcp&srcPort={taken_port}"))
        .await;

    assert_eq!(status, StatusCode::CONFLICT, "{answer}");
    let message = answer["Message"].as_str().unwrap_or_default();
    assert!(
        message.contains(&format!("port {taken_port}")) && message.contains("already in use"),
        "{message}"
    );
    proxy.assert_unchanged_since(&before).await;
    assert!(proxy.stored_spec("db").await.is_none(), "nothing stored");
    assert_eq!(proxy.names_answering("/demo", None, 1).await, ["demo"]);
    drop(taken);
}
