//! flow-proxy restarted on the same machine restores every route from the KV store by itself.

use reqwest::StatusCode;

use crate::helpers::{spawn_backend, TestProxy};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_proxy_restores_routes_from_kv_and_forgets_removed_ones() {
    let mut proxy = TestProxy::spawn().await;
    let kept = spawn_backend("kept").await;
    let gone = spawn_backend("gone").await;
    proxy.register_instance("kept", "kept.1", kept.port).await;
    proxy.register_instance("gone", "gone.1", gone.port).await;
    assert_eq!(
        proxy
            .reconfigure("serviceName=kept&servicePath=/kept&serviceDomain=kept.example.com")
            .await
            .0,
        StatusCode::OK
    );
    assert_eq!(
        proxy
            .reconfigure("serviceName=gone&servicePath=/gone")
            .await
            .0,
        StatusCode::OK
    );
    assert_eq!(proxy.remove("serviceName=gone").await.0, StatusCode::OK);
    assert!(
        proxy.stored_spec("kept").await.is_some(),
        "a routed spec is stored in KV"
    );
    assert!(
        proxy.stored_spec("gone").await.is_none(),
        "a removed spec is deleted from KV"
    );
    let config_before = proxy.config().await;

    proxy.stop().await;
    // Without its haproxy.cfg, only the KV store can tell the new process what to route.
    std::fs::remove_file(proxy.data_dir.path().join("haproxy.cfg")).expect("remove haproxy.cfg");
    proxy.start_again().await;

    assert_eq!(
        proxy
            .names_answering("/kept", Some("kept.example.com"), 1)
            .await,
        ["kept"]
    );
    let (status, _) = proxy.get_through_proxy("/gone", None).await;
    assert_eq!(
        status,
        StatusCode::SERVICE_UNAVAILABLE,
        "a removed service stays removed"
    );
    let services = proxy.services().await;
    let names: Vec<&str> = services
        .as_array()
        .expect("a list")
        .iter()
        .filter_map(|s| s["ServiceName"].as_str())
        .collect();
    assert_eq!(names, ["kept"]);
    assert_eq!(
        proxy.config().await,
        config_before,
        "the same state renders the same file"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stored_spec_that_no_longer_validates_is_skipped_and_can_be_removed() {
    let mut proxy = TestProxy::spawn().await;
    let good = spawn_backend("good").await;
    proxy.register_instance("good", "good.1", good.port).await;
    assert_eq!(
        proxy
            .reconfigure("serviceName=good&servicePath=/good")
            .await
            .0,
        StatusCode::OK
    );
    // Someone edits KV by hand: a path with a newline would inject a line into haproxy.cfg.
    proxy
        .put_kv(
            "flow-proxy/services/evil",
            r#"{"ServiceName":"evil","ServiceDest":[{"Index":0,"ServicePath":["/x\nbackend evil"]}]}"#,
        )
        .await;
    proxy
        .put_kv("flow-proxy/services/garbage", "not json")
        .await;

    proxy.stop().await;
    proxy.start_again().await;

    assert_eq!(proxy.names_answering("/good", None, 1).await, ["good"]);
    let (_, services) = proxy.api_get("/services").await;
    assert_eq!(services.as_array().map(Vec::len), Some(1), "{services}");
    assert!(!proxy.config().await.contains("evil"));

    // The operator cleans up through the API: the bad documents go, nothing else changes.
    let before = proxy.snapshot().await;
    for name in ["evil", "garbage"] {
        let (status, answer) = proxy.remove(&format!("serviceName={name}")).await;
        assert_eq!(status, StatusCode::OK, "{answer}");
        assert_eq!(answer["ServiceName"], name);
        assert!(
            answer["Message"]
                .as_str()
                .is_some_and(|message| message.contains("did not validate")),
            "{answer}"
        );
        assert_eq!(proxy.stored_spec(name).await, None, "{name} is deleted");
    }
    proxy.assert_unchanged_since(&before).await;
    assert_eq!(proxy.names_answering("/good", None, 1).await, ["good"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reconfigure_that_changes_nothing_leaves_a_stored_document_written_another_way() {
    let mut proxy = TestProxy::spawn().await;
    let web = spawn_backend("web").await;
    proxy.register_instance("web", "web.1", web.port).await;
    // Written by hand (or by another version): the defaults left out.
    let written = r#"{"ServiceName":"web","ServiceDest":[{"Index":0,"ServicePath":["/web"]}]}"#;
    proxy.put_kv("flow-proxy/services/web", written).await;
    proxy.stop().await;
    proxy.start_again().await;
    assert_eq!(proxy.names_answering("/web", None, 1).await, ["web"]);
    let before = stored_entry(&proxy).await;

    proxy
        .reconfigure_ok("serviceName=web&servicePath=/web")
        .await;
    assert_eq!(
        stored_entry(&proxy).await,
        before,
        "the same spec is not written again: no write wakes every proxy's watch"
    );

    proxy
        .reconfigure_ok("serviceName=web&servicePath=/web2")
        .await;
    let (index, _) = stored_entry(&proxy).await;
    assert!(index > before.0, "a changed spec is written");
    assert_eq!(
        proxy.stored_spec("web").await.expect("stored")["ServiceDest"][0]["ServicePath"][0],
        "/web2"
    );
}

/// The `ModifyIndex` and the (base64) value of web's stored document.
async fn stored_entry(proxy: &TestProxy) -> (u64, String) {
    let entries = proxy.registry_json("/v1/kv/flow-proxy/services/web").await;
    (
        entries[0]["ModifyIndex"].as_u64().expect("an index"),
        entries[0]["Value"].as_str().expect("a value").to_string(),
    )
}
