//! Migration from Docker Flow Proxy: a proxy starting on a Consul that holds Docker Flow Proxy's
//! layout (`docker-flow/<service>/<field>`) and nothing of its own imports it once.

use reqwest::StatusCode;
use serde_json::Value;

use crate::fleet::{ProxyOptions, ProxyProcess, SharedRegistry, KV_PREFIX};
use crate::helpers::spawn_backend;

/// Writes the keys Docker Flow Proxy left for `go-demo` (blue, two paths, a domain), `legacy`
/// (one path), and `broken` (a path HAProxy could be fooled with), plus its service index.
async fn write_docker_flow_layout(registry: &SharedRegistry) {
    for (key, value) in [
        ("docker-flow/go-demo/path", "/demo,/api"),
        ("docker-flow/go-demo/domain", "go-demo.example.com"),
        ("docker-flow/go-demo/color", "blue"),
        ("docker-flow/go-demo/pathtype", "path_beg"),
        ("docker-flow/go-demo/skipcheck", "false"),
        ("docker-flow/go-demo/hostname", "go-demo.internal"),
        ("docker-flow/go-demo/consultemplatefepath", ""),
        ("docker-flow/legacy/path", "/legacy"),
        ("docker-flow/broken/path", "/a b\n#"),
        ("docker-flow/service/go-demo", "swarm"),
    ] {
        registry.put_kv(key, value).await;
    }
}

async fn routed_names(proxy: &ProxyProcess) -> Vec<String> {
    proxy
        .services()
        .await
        .as_array()
        .expect("a list of specs")
        .iter()
        .map(|spec| spec["ServiceName"].as_str().unwrap_or_default().to_string())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn docker_flow_proxys_layout_is_imported_once_on_an_empty_prefix() {
    let registry = SharedRegistry::start().await;
    let blue = spawn_backend("go-demo-blue").await;
    let legacy = spawn_backend("legacy").await;
    registry
        .register_instance("go-demo-blue", "go-demo-blue.1", blue.port)
        .await;
    registry
        .register_instance("legacy", "legacy.1", legacy.port)
        .await;
    write_docker_flow_layout(&registry).await;
    let docker_flow_keys = registry.kv_keys("docker-flow/").await;

    let mut proxy = ProxyProcess::start(&registry.address(), &[]).await;

    assert_eq!(routed_names(&proxy).await, ["go-demo", "legacy"]);
    assert_eq!(
        proxy
            .get_through_proxy("/api/items", Some("go-demo.example.com"))
            .await,
        (StatusCode::OK, "go-demo-blue /api/items".to_string()),
        "the imported route keeps its domain, paths and color"
    );
    assert_eq!(
        proxy.get_through_proxy("/legacy", None).await,
        (StatusCode::OK, "legacy /legacy".to_string())
    );
    let stored: Value = registry
        .stored_spec("go-demo")
        .await
        .expect("go-demo is stored in the new layout");
    assert_eq!(stored["ServiceColor"], "blue");
    assert_eq!(stored["ServiceDest"][0]["ServicePath"][1], "/api");
    assert_eq!(
        stored["ServiceDest"][0]["ServiceDomain"][0],
        "go-demo.example.com"
    );
    assert_eq!(
        registry.stored_spec("broken").await,
        None,
        "invalid values are not imported"
    );
    assert_eq!(
        registry.kv_keys("docker-flow/").await,
        docker_flow_keys,
        "the old layout is left as it was"
    );
    let log = proxy.log();
    assert!(
        log.contains("imported a service from Docker Flow Proxy's layout"),
        "the import is logged:\n{log}"
    );

    // Once: after every imported service is removed, a restart does not bring them back.
    for name in ["go-demo", "legacy"] {
        let (status, body) = proxy.remove(&format!("serviceName={name}")).await;
        assert_eq!(status, StatusCode::OK, "{body}");
    }
    assert!(proxy.stop().await.success());
    let again = ProxyProcess::start_with(
        &registry.address(),
        ProxyOptions {
            data_dir: Some(proxy.data_dir().to_path_buf()),
            ..ProxyOptions::default()
        },
    )
    .await;
    assert!(routed_names(&again).await.is_empty(), "nothing came back");
    assert_eq!(
        registry.kv_keys(&format!("{KV_PREFIX}/services/")).await,
        Vec::<String>::new()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_old_layout_is_ignored_when_flow_proxy_already_stores_services() {
    let registry = SharedRegistry::start().await;
    let web = spawn_backend("web").await;
    registry.register_instance("web", "web.1", web.port).await;
    write_docker_flow_layout(&registry).await;
    let web_spec = serde_json::json!({
        "ServiceName": "web", "ServiceColor": null, "AclName": null, "SkipCheck": false,
        "PathType": "path_beg",
        "ServiceDest": [{"Index": 0, "ServicePath": ["/web"], "ServiceDomain": [],
                         "PathType": null, "Port": null, "SrcPort": null, "ReqMode": "http"}]
    });
    registry
        .put_kv(&format!("{KV_PREFIX}/services/web"), web_spec.to_string())
        .await;

    let proxy = ProxyProcess::start(&registry.address(), &[]).await;

    assert_eq!(routed_names(&proxy).await, ["web"]);
    assert_eq!(
        proxy.get_through_proxy("/web", None).await,
        (StatusCode::OK, "web /web".to_string())
    );
    assert_eq!(
        registry.kv_keys(&format!("{KV_PREFIX}/")).await,
        [format!("{KV_PREFIX}/services/web")],
        "nothing was imported"
    );
}
