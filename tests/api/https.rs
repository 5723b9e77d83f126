//! HTTPS: certificates stored through the API are served by HAProxy's HTTPS frontend, picked by
//! SNI, shared through Consul KV with every proxy, checked before HAProxy sees them, and never
//! shown with their key. Every request here is a real TLS handshake with HAProxy.

use std::net::Ipv4Addr;
use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use reqwest::StatusCode;
use rustls::pki_types::CertificateDer;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::fleet::eventually;
use crate::helpers::{spawn_backend, TestProxy};
use crate::tls::{client_config, tls_connect, TestCa};

/// What a TLS client saw: the server's certificate names, the ALPN protocol, and the HTTP answer
/// (status line and body) to `GET path` with `Host: sni`.
struct TlsAnswer {
    dns_names: Vec<String>,
    status_line: String,
    body: String,
}

/// `GET path` over TLS to HAProxy's HTTPS port, trusting only `root`.
async fn https_get(port: u16, sni: &str, path: &str, root: &CertificateDer<'static>) -> TlsAnswer {
    let mut stream = tls_connect(port, sni, client_config(root, &[b"http/1.1"]))
        .await
        .unwrap_or_else(|error| panic!("TLS handshake with {sni}: {error}"));
    let dns_names = {
        let (_, session) = stream.get_ref();
        let leaf = &session.peer_certificates().expect("a server certificate")[0];
        let (_, parsed) = x509_parser::parse_x509_certificate(leaf).expect("X.509");
        let names = parsed
            .subject_alternative_name()
            .expect("SAN readable")
            .map(|san| {
                san.value
                    .general_names
                    .iter()
                    .filter_map(|name| match name {
                        x509_parser::extensions::GeneralName::DNSName(dns) => Some(dns.to_string()),
                        _ => None,
                    })
                    .collect()
            })
            .unwrap_or_default();
        names
    };
    let request = format!("GET {path} HTTP/1.1\r\nHost: {sni}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.expect("send");
    let mut answer = Vec::new();
    // HAProxy may close without close_notify: what was read is the answer.
    let _ = stream.read_to_end(&mut answer).await;
    let answer = String::from_utf8_lossy(&answer).into_owned();
    let (head, body) = answer.split_once("\r\n\r\n").unwrap_or((&answer, ""));
    TlsAnswer {
        dns_names,
        status_line: head.lines().next().unwrap_or_default().to_string(),
        body: body.to_string(),
    }
}

/// A backend that answers `<name> <path> proto=<X-Forwarded-Proto>`.
async fn spawn_proto_backend(name: &'static str) -> (u16, tokio::task::JoinHandle<()>) {
    let listener = tokio::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .await
        .expect("bind backend");
    let port = listener.local_addr().expect("address").port();
    let app = axum::Router::new().fallback(
        move |uri: axum::http::Uri, headers: axum::http::HeaderMap| async move {
            let proto = headers
                .get("x-forwarded-proto")
                .and_then(|value| value.to_str().ok())
                .unwrap_or("none")
                .to_string();
            format!("{name} {} proto={proto}", uri.path())
        },
    );
    let task = tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    (port, task)
}

async fn put_cert(proxy: &TestProxy, name: &str, pem: &str) -> (StatusCode, Value) {
    let response = proxy
        .http()
        .put(proxy.api(&format!("/v1/docker-flow-proxy/cert?certName={name}")))
        .body(pem.to_string())
        .send()
        .await
        .expect("the API answers");
    let status = response.status();
    (status, response.json().await.expect("JSON answer"))
}

async fn listed_certs(proxy: &TestProxy) -> Vec<Value> {
    let (status, body) = proxy.api_get("/v1/docker-flow-proxy/certs").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    body["Certs"].as_array().cloned().unwrap_or_default()
}

fn https_port(proxy: &TestProxy) -> u16 {
    proxy.settings().https_port
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stored_certificates_are_served_by_sni_with_h2_and_x_forwarded_proto() {
    let ca = TestCa::new();
    let (port, _backend) = spawn_proto_backend("app").await;
    let proxy = TestProxy::spawn().await;
    proxy.register_instance("app", "app-1", port).await;
    proxy.reconfigure_ok("serviceName=app&servicePath=/").await;

    // No certificate: no HTTPS listener, and nothing fails.
    assert!(!proxy.config().await.contains("frontend https"));
    assert!(
        tokio::net::TcpStream::connect((Ipv4Addr::LOCALHOST, https_port(&proxy)))
            .await
            .is_err(),
        "no HTTPS listener without a certificate"
    );

    let shop = ca.bundle(&["shop.example.test"]);
    let blog = ca.bundle(&["blog.example.test", "www.blog.example.test"]);
    for (name, pem) in [("shop", &shop), ("blog", &blog)] {
        let (status, answer) = put_cert(&proxy, name, pem).await;
        assert_eq!(status, StatusCode::OK, "{answer}");
        assert_eq!(answer["Message"], "", "{answer}");
    }

    // SNI picks each certificate; the request reaches the service, marked https.
    for (sni, expected) in [
        ("shop.example.test", vec!["shop.example.test"]),
        (
            "www.blog.example.test",
            vec!["blog.example.test", "www.blog.example.test"],
        ),
    ] {
        let answer = https_get(https_port(&proxy), sni, "/hello", &ca.root).await;
        assert_eq!(answer.dns_names, expected, "{sni}");
        assert!(
            answer.status_line.contains("200"),
            "{sni}: {}",
            answer.status_line
        );
        assert_eq!(answer.body, "app /hello proto=https");
    }
    // Plain HTTP still works and is not marked https.
    assert_eq!(
        proxy.get_through_proxy("/hello", None).await,
        (StatusCode::OK, "app /hello proto=none".into())
    );
    // ALPN offers HTTP/2.
    let stream = tls_connect(
        https_port(&proxy),
        "shop.example.test",
        client_config(&ca.root, &[b"h2", b"http/1.1"]),
    )
    .await
    .expect("handshake");
    assert_eq!(stream.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));

    // The listing shows names, expiry and fingerprint, never a key.
    let listed = listed_certs(&proxy).await;
    let names: Vec<&str> = listed.iter().filter_map(|c| c["Name"].as_str()).collect();
    assert_eq!(names, ["blog", "shop"]);
    assert_eq!(listed[0]["DnsNames"][1], "www.blog.example.test");
    assert_eq!(listed[1]["Fingerprint"].as_str().map(str::len), Some(64));
    assert!(listed[1]["NotAfter"].as_str().is_some());
    for shown in [
        serde_json::to_string(&listed).expect("json"),
        proxy.config().await,
        serde_json::to_string(&proxy.services().await).expect("json"),
    ] {
        assert!(!shown.contains("PRIVATE KEY"), "{shown}");
    }
    // On disk the bundles are readable by the owner only.
    let certs_dir = proxy.data_dir().join("certs");
    let mut files = 0;
    for entry in std::fs::read_dir(&certs_dir).expect("certs directory") {
        let metadata = entry.expect("entry").metadata().expect("metadata");
        assert_eq!(metadata.permissions().mode() & 0o777, 0o600);
        files += 1;
    }
    assert_eq!(files, 3, "two bundles and one crt-list");

    // Deleting one: its name falls back to the other (the default) certificate.
    let response = proxy
        .http()
        .delete(proxy.api("/v1/docker-flow-proxy/cert?certName=shop"))
        .send()
        .await
        .expect("the API answers");
    assert_eq!(response.status(), StatusCode::OK);
    let answer = https_get(https_port(&proxy), "blog.example.test", "/", &ca.root).await;
    assert!(answer.status_line.contains("200"));
    assert_eq!(listed_certs(&proxy).await.len(), 1);
    let response = proxy
        .http()
        .delete(proxy.api("/cert?certName=shop"))
        .send()
        .await
        .expect("the API answers");
    assert_eq!(response.status(), StatusCode::NOT_FOUND);
    assert_eq!(
        std::fs::read_dir(&certs_dir)
            .expect("certs directory")
            .count(),
        2,
        "the deleted bundle's file is gone"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_keyless_and_mismatched_certificates_are_refused_and_change_nothing() {
    let ca = TestCa::new();
    let backend = spawn_backend("app").await;
    let proxy = TestProxy::spawn().await;
    proxy.register_instance("app", "app-1", backend.port).await;
    proxy
        .reconfigure_ok("serviceName=app&servicePath=/app")
        .await;
    let good = ca.bundle(&["good.example.test"]);
    put_cert(&proxy, "good", &good).await;
    let before = proxy.snapshot().await;

    let other = ca.bundle(&["other.example.test"]);
    let certificate_only = good
        .split_inclusive("-----END CERTIFICATE-----\n")
        .next()
        .expect("the certificate block")
        .to_string();
    let other_key = other
        .split_once("-----END CERTIFICATE-----\n")
        .map(|(_, key)| key)
        .expect("the key block");
    let mismatched = format!("{certificate_only}{other_key}");
    for (pem, says) in [
        ("hello, I am not a certificate", "not PEM"),
        (certificate_only.as_str(), "no private key"),
        (mismatched.as_str(), "does not match"),
    ] {
        let (status, answer) = put_cert(&proxy, "bad", pem).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{answer}");
        let message = answer["Message"].as_str().unwrap_or_default();
        assert!(message.contains(says), "{message}");
        assert!(!message.contains("PRIVATE KEY-----"), "{message}");
    }
    let (status, answer) = put_cert(&proxy, "bad%0Aname", &good).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{answer}");
    assert!(answer["Message"]
        .as_str()
        .unwrap_or_default()
        .contains("certName"));

    proxy.assert_unchanged_since(&before).await;
    assert_eq!(listed_certs(&proxy).await.len(), 1);
    let stored = proxy
        .http()
        .get(format!(
            "http://{}/v1/kv/flow-proxy/certs/?keys",
            proxy.registry_address()
        ))
        .send()
        .await
        .expect("registry answers")
        .json::<Vec<String>>()
        .await
        .expect("keys");
    assert_eq!(stored, ["flow-proxy/certs/good"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_certificate_is_accepted_with_a_warning() {
    let mut params =
        rcgen::CertificateParams::new(vec!["old.example.test".to_string()]).expect("params");
    params.not_before = rcgen::date_time_ymd(2020, 1, 1);
    params.not_after = rcgen::date_time_ymd(2021, 1, 1);
    let key = rcgen::KeyPair::generate().expect("key");
    let certificate = params.self_signed(&key).expect("certificate");
    let proxy = TestProxy::spawn().await;
    let (status, answer) = put_cert(
        &proxy,
        "old",
        &format!("{}{}", certificate.pem(), key.serialize_pem()),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    let message = answer["Message"].as_str().unwrap_or_default();
    assert!(
        message.contains("expired") && message.contains("2021-01-01"),
        "{message}"
    );
    assert_eq!(answer["Certificate"]["Expired"], true);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_put_through_one_proxy_is_served_by_another_and_by_a_failover() {
    let ca = TestCa::new();
    let backend = spawn_backend("app").await;
    let proxy_a = TestProxy::spawn().await;
    let registry = proxy_a.registry_address();
    let proxy_b = TestProxy::spawn_with(|settings| {
        settings.consul_address = vec![registry.clone()];
    })
    .await;
    proxy_a
        .register_instance("app", "app-1", backend.port)
        .await;
    proxy_a
        .reconfigure_ok("serviceName=app&servicePath=/")
        .await;
    let (status, answer) = put_cert(&proxy_a, "shop", &ca.bundle(&["shop.example.test"])).await;
    assert_eq!(status, StatusCode::OK, "{answer}");

    let waited = eventually(
        "B serves the certificate put through A",
        Duration::from_secs(1),
        || {
            let port = https_port(&proxy_b);
            let root = ca.root.clone();
            async move {
                tls_connect(
                    port,
                    "shop.example.test",
                    client_config(&root, &[b"http/1.1"]),
                )
                .await
                .is_ok()
            }
        },
    )
    .await;
    assert!(waited <= Duration::from_secs(1));
    let answer = https_get(https_port(&proxy_b), "shop.example.test", "/x", &ca.root).await;
    assert_eq!(answer.body, "app /x");

    // A failover proxy with an empty data directory serves it from KV alone.
    let failover = TestProxy::spawn_with(|settings| {
        settings.consul_address = vec![registry.clone()];
    })
    .await;
    let answer = https_get(https_port(&failover), "shop.example.test", "/y", &ca.root).await;
    assert_eq!(answer.body, "app /y");
    assert_eq!(
        failover.config().await,
        proxy_b
            .config()
            .await
            .replace(
                &format!(":{}", proxy_b.settings().http_port),
                &format!(":{}", failover.settings().http_port),
            )
            .replace(
                &format!(":{}", https_port(&proxy_b)),
                &format!(":{}", https_port(&failover)),
            )
    );
}
