//! Failover to another machine: a proxy started fresh, with an empty data directory and only the
//! Consul address, serves exactly the routes the proxy it replaces served, without any API call.

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use reqwest::StatusCode;

use crate::fleet::{ProxyOptions, ProxyProcess, SharedRegistry};
use crate::helpers::{free_port, spawn_backend};

/// A TCP server on 127.0.0.1 that sends back what it receives; returns its port.
async fn spawn_echo() -> (u16, tokio::task::JoinHandle<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind the echo server");
    let port = listener.local_addr().expect("echo address").port();
    let task = tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buffer = [0u8; 64];
                if let Ok(read) = stream.read(&mut buffer).await {
                    let _ = stream.write_all(&buffer[..read]).await;
                }
            });
        }
    });
    (port, task)
}

/// Sends `message` to 127.0.0.1:`port` and returns what comes back.
async fn tcp_round_trip(port: u16, message: &[u8]) -> Vec<u8> {
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("HAProxy listens on the TCP service's srcPort");
    stream.write_all(message).await.expect("send");
    let mut reply = vec![0u8; message.len()];
    stream.read_exact(&mut reply).await.expect("echo back");
    reply
}

/// What a user sees through one proxy: the answer to each request, and the TCP echo.
async fn observed_routes(proxy: &ProxyProcess, tcp_port: u16) -> Vec<(StatusCode, String)> {
    let requests: [(&str, Option<&str>); 7] = [
        ("/api/items", None),
        ("/docs/intro", None),
        ("/", Some("shop.example.com")),
        ("/anything", Some("eu.tenant.example.com")),
        ("/demo", None),
        ("/admin/users", None),
        ("/removed", None),
    ];
    let mut seen = Vec::new();
    for (path, host) in requests {
        seen.push(proxy.get_through_proxy(path, host).await);
    }
    let echo = tcp_round_trip(tcp_port, b"PING").await;
    seen.push((StatusCode::OK, String::from_utf8_lossy(&echo).into_owned()));
    seen
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fresh_proxy_on_another_machine_serves_the_same_routes_and_the_same_file() {
    let registry = SharedRegistry::start().await;
    let mut a = ProxyProcess::start(&registry.address(), &[]).await;

    let api = spawn_backend("api").await;
    let docs = spawn_backend("docs").await;
    let shop = spawn_backend("shop").await;
    let tenant = spawn_backend("tenant").await;
    let green = spawn_backend("go-demo-green").await;
    let admin = spawn_backend("admin").await;
    let (echo_port, _echo) = spawn_echo().await;
    registry.register_instance("api", "api.1", api.port).await;
    registry
        .register_instance("docs", "docs.1", docs.port)
        .await;
    registry
        .register_instance("shop", "shop.1", shop.port)
        .await;
    registry
        .register_instance("tenant", "tenant.1", tenant.port)
        .await;
    registry
        .register_instance("go-demo-green", "go-demo-green.1", green.port)
        .await;
    registry
        .register_instance("backoffice", "bo.1", api.port)
        .await;
    registry
        .register_instance("redis", "redis.1", echo_port)
        .await;
    registry.register_instance("old", "old.1", docs.port).await;
    let tcp_port = free_port();

    for query in [
        "serviceName=api&servicePath=/api,/v2/api".to_string(),
        "serviceName=docs&servicePath=/docs&pathType=path_beg&aclName=a-docs".to_string(),
        "serviceName=shop&serviceDomain=shop.example.com".to_string(),
        "serviceName=tenant&serviceDomain=*.tenant.example.com".to_string(),
        "serviceName=go-demo&servicePath=/demo&serviceColor=green".to_string(),
        format!(
            "serviceName=backoffice&servicePath=/bo&servicePath.1=/admin&port.1={}",
            admin.port
        ),
        format!("serviceName=redis&reqMode=tcp&srcPort={tcp_port}"),
        "serviceName=old&servicePath=/removed".to_string(),
    ] {
        let (status, body) = a.reconfigure(&query).await;
        assert_eq!(status, StatusCode::OK, "{query}: {body}");
    }
    let (status, body) = a.remove("serviceName=old").await;
    assert_eq!(status, StatusCode::OK, "{body}");

    let config_on_a = a.config().await;
    let routes_on_a = observed_routes(&a, tcp_port).await;
    assert_eq!(
        routes_on_a,
        [
            (StatusCode::OK, "api /api/items".to_string()),
            (StatusCode::OK, "docs /docs/intro".to_string()),
            (StatusCode::OK, "shop /".to_string()),
            (StatusCode::OK, "tenant /anything".to_string()),
            (StatusCode::OK, "go-demo-green /demo".to_string()),
            (StatusCode::OK, "admin /admin/users".to_string()),
            (StatusCode::SERVICE_UNAVAILABLE, a_503_page(&a).await),
            (StatusCode::OK, "PING".to_string()),
        ],
        "A serves every route it was given, and not the removed one"
    );
    assert!(a.stop().await.success(), "A stops cleanly");

    // B: another machine. Nothing but the Consul address and the same ports; no API call.
    let b = ProxyProcess::start_with(
        &registry.address(),
        ProxyOptions {
            http_port: Some(a.http_port),
            ..ProxyOptions::default()
        },
    )
    .await;
    assert_ne!(b.data_dir(), a.data_dir());
    assert_eq!(
        b.config().await,
        config_on_a,
        "B renders a byte-identical haproxy.cfg"
    );
    assert_eq!(
        observed_routes(&b, tcp_port).await,
        routes_on_a,
        "B serves exactly A's routes"
    );
}

/// The body of the 503 page HAProxy serves for an unrouted request.
async fn a_503_page(proxy: &ProxyProcess) -> String {
    let (status, body) = proxy.get_through_proxy("/no-such-route", None).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    body
}
