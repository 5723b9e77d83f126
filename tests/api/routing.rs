//! A user routes services by path, by domain, by color and over TCP, and takes them off again.

use std::collections::BTreeSet;

use reqwest::StatusCode;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::helpers::{free_port, spawn_backend, TestProxy};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_empty_proxy_answers_503() {
    let proxy = TestProxy::spawn().await;

    let (status, body) = proxy.get_through_proxy("/demo", None).await;

    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(body.contains("503"), "the clean 503 page: {body}");
    let (status, ping) = proxy.api_get("/v1/docker-flow-proxy/ping").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(ping["Status"], "OK");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconfigure_routes_a_path_to_every_instance_round_robin() {
    let proxy = TestProxy::spawn().await;
    let first = spawn_backend("first").await;
    let second = spawn_backend("second").await;
    proxy
        .register_instance("go-demo", "host:go-demo.1:8080", first.port)
        .await;
    proxy
        .register_instance("go-demo", "host:go-demo.2:8080", second.port)
        .await;

    let (status, answer) = proxy
        .reconfigure("serviceName=go-demo&servicePath=/demo")
        .await;

    assert_eq!(status, StatusCode::OK, "{answer}");
    assert_eq!(answer["Status"], "OK");
    assert_eq!(answer["ServiceName"], "go-demo");
    // The answer came once HAProxy served the route: no waiting needed.
    let (status, body) = proxy.get_through_proxy("/demo/hello", None).await;
    assert_eq!(status, StatusCode::OK);
    assert!(
        body.ends_with(" /demo/hello"),
        "the path reaches the instance unchanged: {body}"
    );
    let names = proxy.names_answering("/demo/hello", None, 4).await;
    assert_ne!(names[0], names[1], "round robin alternates: {names:?}");
    assert_eq!(names[0], names[2], "round robin alternates: {names:?}");
    assert_eq!(
        names.iter().cloned().collect::<BTreeSet<_>>(),
        BTreeSet::from(["first".to_string(), "second".to_string()])
    );
    let (status, _) = proxy.get_through_proxy("/elsewhere", None).await;
    assert_eq!(
        status,
        StatusCode::SERVICE_UNAVAILABLE,
        "other paths stay unrouted"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_short_endpoint_names_and_put_work_like_docker_flow_proxy() {
    let proxy = TestProxy::spawn().await;
    let backend = spawn_backend("short").await;
    proxy
        .register_instance("short", "short.1", backend.port)
        .await;

    let response = reqwest::Client::new()
        .put(proxy.api("/reconfigure?serviceName=short&servicePath=/short"))
        .send()
        .await
        .expect("API answers");

    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(proxy.names_answering("/short", None, 1).await, ["short"]);
    let (status, services) = proxy.api_get("/services").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(services[0]["ServiceName"], "short");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn domains_route_every_path_of_their_host_and_wildcards_match_the_end() {
    let proxy = TestProxy::spawn().await;
    let site = spawn_backend("site").await;
    let tenants = spawn_backend("tenants").await;
    proxy.register_instance("site", "site.1", site.port).await;
    proxy
        .register_instance("tenants", "tenants.1", tenants.port)
        .await;

    let (status, answer) = proxy
        .reconfigure("serviceName=site&serviceDomain=example.com")
        .await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    let (status, answer) = proxy
        .reconfigure("serviceName=tenants&serviceDomain=*.example.org")
        .await;
    assert_eq!(status, StatusCode::OK, "{answer}");

    assert_eq!(
        proxy
            .names_answering("/any/path", Some("example.com"), 1)
            .await,
        ["site"]
    );
    assert_eq!(
        proxy
            .names_answering("/", Some("EXAMPLE.com:8080"), 1)
            .await,
        ["site"]
    );
    assert_eq!(
        proxy
            .names_answering("/x", Some("shop.example.org"), 1)
            .await,
        ["tenants"]
    );
    let (status, _) = proxy
        .get_through_proxy("/any/path", Some("example.net"))
        .await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn remove_takes_one_service_off_and_leaves_the_others() {
    let proxy = TestProxy::spawn().await;
    let users = spawn_backend("users").await;
    let orders = spawn_backend("orders").await;
    proxy
        .register_instance("users", "users.1", users.port)
        .await;
    proxy
        .register_instance("orders", "orders.1", orders.port)
        .await;
    assert_eq!(
        proxy
            .reconfigure("serviceName=users&servicePath=/users")
            .await
            .0,
        StatusCode::OK
    );
    assert_eq!(
        proxy
            .reconfigure("serviceName=orders&servicePath=/orders")
            .await
            .0,
        StatusCode::OK
    );

    let (status, answer) = proxy.remove("serviceName=users").await;

    assert_eq!(status, StatusCode::OK, "{answer}");
    assert_eq!(answer["ServiceName"], "users");
    let (status, _) = proxy.get_through_proxy("/users", None).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(proxy.names_answering("/orders", None, 1).await, ["orders"]);
    let (status, answer) = proxy.remove("serviceName=users").await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{answer}");
    assert_eq!(answer["Status"], "NOK");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_color_switch_moves_traffic_from_blue_to_green() {
    let proxy = TestProxy::spawn().await;
    let blue = spawn_backend("blue").await;
    let green = spawn_backend("green").await;
    proxy
        .register_instance("go-demo-blue", "go-demo-blue.1", blue.port)
        .await;
    proxy
        .register_instance("go-demo-green", "go-demo-green.1", green.port)
        .await;

    let (status, answer) = proxy
        .reconfigure("serviceName=go-demo&servicePath=/demo&serviceColor=blue")
        .await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    assert_eq!(
        proxy.names_answering("/demo", None, 3).await,
        ["blue", "blue", "blue"]
    );

    let (status, answer) = proxy
        .reconfigure("serviceName=go-demo&servicePath=/demo&serviceColor=green")
        .await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    assert_eq!(
        proxy.names_answering("/demo", None, 3).await,
        ["green", "green", "green"]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn indexed_destinations_route_each_path_to_its_own_port() {
    let proxy = TestProxy::spawn().await;
    let api = spawn_backend("api").await;
    let admin = spawn_backend("admin").await;
    // One instance registered with its API port; its admin port is only named in the request.
    proxy.register_instance("shop", "shop.1", api.port).await;

    let query = format!(
        "serviceName=shop&servicePath=/api&servicePath.1=/admin&port.1={}",
        admin.port
    );
    let (status, answer) = proxy.reconfigure(&query).await;

    assert_eq!(status, StatusCode::OK, "{answer}");
    assert_eq!(proxy.names_answering("/api/items", None, 1).await, ["api"]);
    assert_eq!(
        proxy.names_answering("/admin/users", None, 1).await,
        ["admin"]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tcp_service_is_served_on_its_src_port() {
    let proxy = TestProxy::spawn().await;
    let echo = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind echo server");
    let echo_port = echo.local_addr().expect("echo address").port();
    let echo_task = tokio::spawn(async move {
        while let Ok((mut stream, _)) = echo.accept().await {
            tokio::spawn(async move {
                let mut buffer = [0u8; 64];
                if let Ok(read) = stream.read(&mut buffer).await {
                    let _ = stream.write_all(&buffer[..read]).await;
                }
            });
        }
    });
    proxy.register_instance("redis", "redis.1", echo_port).await;
    let src_port = free_port();

    let (status, answer) = proxy
        .reconfigure(&format!("serviceName=redis&reqMode=tcp&srcPort={src_port}"))
        .await;

    assert_eq!(status, StatusCode::OK, "{answer}");
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", src_port))
        .await
        .expect("HAProxy listens on srcPort");
    stream.write_all(b"PING").await.expect("send");
    let mut reply = [0u8; 4];
    stream
        .read_exact(&mut reply)
        .await
        .expect("echo through HAProxy");
    assert_eq!(&reply, b"PING");
    echo_task.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_rereads_the_instances_from_the_registry() {
    let proxy = TestProxy::spawn().await;
    let staying = spawn_backend("staying").await;
    let leaving = spawn_backend("leaving").await;
    proxy.register_instance("web", "web.1", staying.port).await;
    proxy.register_instance("web", "web.2", leaving.port).await;
    assert_eq!(
        proxy
            .reconfigure("serviceName=web&servicePath=/web")
            .await
            .0,
        StatusCode::OK
    );
    let before: BTreeSet<String> = proxy
        .names_answering("/web", None, 4)
        .await
        .into_iter()
        .collect();
    assert_eq!(before.len(), 2, "both instances serve: {before:?}");

    proxy.deregister_instance("web.2").await;
    let (status, answer) = proxy.api_get("/v1/docker-flow-proxy/reload").await;

    assert_eq!(status, StatusCode::OK, "{answer}");
    assert_eq!(proxy.names_answering("/web", None, 4).await, ["staying"; 4]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_without_healthy_instances_gets_a_503_backend() {
    let proxy = TestProxy::spawn().await;

    let (status, answer) = proxy
        .reconfigure("serviceName=not-yet-deployed&servicePath=/soon")
        .await;

    assert_eq!(status, StatusCode::OK, "{answer}");
    let (status, body) = proxy.get_through_proxy("/soon", None).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(body.contains("503"), "the clean 503 page: {body}");
    assert!(proxy
        .config()
        .await
        .contains("backend not-yet-deployed-be0"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_concurrent_reconfigures_gets_one_answer_each() {
    let proxy = TestProxy::spawn().await;
    let backend = spawn_backend("burst").await;
    for index in 0..10 {
        proxy
            .register_instance(
                &format!("burst{index}"),
                &format!("burst{index}.1"),
                backend.port,
            )
            .await;
    }

    // Five changes at once queue up together and are applied together.
    let first_half =
        (0..5).map(|index| format!("serviceName=burst{index}&servicePath=/burst{index}"));
    for (status, answer) in reconfigure_all(&proxy, first_half).await {
        assert_eq!(status, StatusCode::OK, "{answer}");
    }
    // Five more plus one HAProxy refuses: the refused one must not take the others down.
    let second_half =
        (5..10).map(|index| format!("serviceName=burst{index}&servicePath=/burst{index}"));
    let bad = "serviceName=broken&servicePath=/broken[&pathType=path_reg".to_string();
    let answers = reconfigure_all(&proxy, second_half.chain([bad])).await;

    for (status, answer) in &answers[..5] {
        assert_eq!(*status, StatusCode::OK, "{answer}");
    }
    assert_eq!(answers[5].0, StatusCode::BAD_REQUEST, "{}", answers[5].1);
    for index in 0..10 {
        let path = format!("/burst{index}");
        assert_eq!(proxy.names_answering(&path, None, 1).await, ["burst"]);
    }
    assert!(proxy.stored_spec("broken").await.is_none());
    assert!(!proxy.config().await.contains("broken"));
}

/// Sends every reconfigure at once; the answers in query order.
async fn reconfigure_all(
    proxy: &TestProxy,
    queries: impl Iterator<Item = String>,
) -> Vec<(StatusCode, serde_json::Value)> {
    futures::future::join_all(queries.map(|query| async move { proxy.reconfigure(&query).await }))
        .await
}
