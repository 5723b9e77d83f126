//! TLS per service: a certificate sent with the reconfigure request (`serviceCert`), mutual TLS
//! for one service (`verifyClientSsl` with `--ca-file`), and instances that speak TLS
//! (`sslVerifyNone`). Every request here is a real TLS handshake with HAProxy.

use std::os::unix::fs::PermissionsExt;
use std::sync::Arc;
use std::time::Duration;

use reqwest::StatusCode;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::helpers::{spawn_backend, TestProxy};
use crate::tls::{
    http_request, https_request, put_cert, reconfigure_with_body, spawn_tls_backend, tls_connect,
    TestCa, TlsBackend,
};

fn https_port(proxy: &TestProxy) -> u16 {
    proxy.settings().https_port
}

async fn listed_cert_names(proxy: &TestProxy) -> Vec<String> {
    let (status, body) = proxy.api_get("/v1/docker-flow-proxy/certs").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    body["Certs"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .iter()
        .filter_map(|cert| cert["Name"].as_str().map(str::to_string))
        .collect()
}

/// A rustls client trusting `root` and presenting `identity` (a PEM bundle: certificate, key).
fn client_config(root: &CertificateDer<'static>, identity: Option<&str>) -> rustls::ClientConfig {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(root.clone()).expect("CA root");
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("protocol versions")
    .with_root_certificates(roots);
    let mut config = match identity {
        Some(pem) => {
            let chain = CertificateDer::pem_slice_iter(pem.as_bytes())
                .collect::<Result<Vec<_>, _>>()
                .expect("client certificate");
            let key = PrivateKeyDer::from_pem_slice(pem.as_bytes()).expect("client key");
            builder
                .with_client_auth_cert(chain, key)
                .expect("client identity")
        }
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    config
}

/// `GET /` over TLS with SNI `sni` and `Host: host`: the status, or why there was none (the
/// handshake or the exchange failed: HAProxy refused the connection).
async fn https_status(
    port: u16,
    sni: &str,
    host: &str,
    root: &CertificateDer<'static>,
    identity: Option<&str>,
) -> Result<(u16, String), String> {
    let mut stream = tls_connect(port, sni, client_config(root, identity))
        .await
        .map_err(|error| format!("handshake: {error}"))?;
    let request = format!("GET / HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
    stream
        .write_all(request.as_bytes())
        .await
        .map_err(|error| format!("send: {error}"))?;
    let mut answer = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut answer))
        .await
        .map_err(|_| "no answer within 10 s".to_string())?;
    let answer = String::from_utf8_lossy(&answer).into_owned();
    if answer.is_empty() {
        return Err(format!("no answer: {read:?}"));
    }
    let (head, body) = answer.split_once("\r\n\r\n").unwrap_or((&answer, ""));
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|code| code.parse().ok())
        .ok_or_else(|| format!("not HTTP: {answer:?}"))?;
    Ok((status, body.to_string()))
}

/// The root of `ca` as a PEM file in `directory`, for `--ca-file`.
fn write_ca_file(directory: &std::path::Path, ca: &TestCa) -> std::path::PathBuf {
    let path = directory.join("client-ca.pem");
    let pem = pem::encode(&pem::Pem::new("CERTIFICATE", ca.root.to_vec()));
    std::fs::write(&path, pem).expect("write the CA file");
    path
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_sent_with_reconfigure_is_stored_under_the_service_name_and_served() {
    let ca = TestCa::new();
    let shop_backend = spawn_backend("shop").await;
    let blog_backend = spawn_backend("blog").await;
    let proxy = TestProxy::spawn().await;
    proxy
        .register_instance("shop", "shop-1", shop_backend.port)
        .await;
    proxy
        .register_instance("blog", "blog-1", blog_backend.port)
        .await;

    // As the PUT body.
    let shop_pem = ca.bundle(&["shop.example.test"]);
    let (status, answer) = reconfigure_with_body(
        &proxy,
        "serviceName=shop&serviceDomain=shop.example.test",
        &shop_pem,
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    // As Docker Flow Proxy's `serviceCert` query parameter.
    let blog_pem = ca.bundle(&["blog.example.test"]);
    let query = serde_urlencoded::to_string([
        ("serviceName", "blog"),
        ("serviceDomain", "blog.example.test"),
        ("serviceCert", blog_pem.as_str()),
    ])
    .expect("query");
    let (status, answer) = proxy.reconfigure(&query).await;
    assert_eq!(status, StatusCode::OK, "{answer}");

    assert_eq!(listed_cert_names(&proxy).await, ["blog", "shop"]);
    for (sni, body) in [
        ("shop.example.test", "shop /"),
        ("blog.example.test", "blog /"),
    ] {
        let answer = https_request(https_port(&proxy), &ca.root, "GET", "/", sni, &[]).await;
        assert_eq!((answer.status, answer.body.as_str()), (200, body), "{sni}");
    }
    // Stored in KV like a certificate put through /cert: a proxy restarted from its data serves it.
    let kv = proxy
        .http()
        .get(format!(
            "http://{}/v1/kv/flow-proxy/certs/shop?raw",
            proxy.registry_address()
        ))
        .send()
        .await
        .expect("the registry answers");
    assert_eq!(kv.status(), StatusCode::OK);
    assert!(kv.text().await.expect("body").contains("BEGIN CERTIFICATE"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_service_cert_is_refused_naming_it_and_changes_nothing() {
    let ca = TestCa::new();
    let backend = spawn_backend("shop").await;
    let proxy = TestProxy::spawn().await;
    proxy
        .register_instance("shop", "shop-1", backend.port)
        .await;
    proxy.reconfigure_ok("serviceName=shop&servicePath=/").await;
    let before = proxy.snapshot().await;
    let stored_before = proxy.stored_spec("shop").await;

    const KEY_MARKER: &str = "-----BEGIN PRIVATE KEY-----";
    let shop_pem = ca.bundle(&["shop.example.test"]);
    let other_pem = ca.bundle(&["x.example.test"]);
    let (certificate_only, _) = shop_pem.split_once(KEY_MARKER).expect("certificate part");
    let (_, other_key) = other_pem.split_once(KEY_MARKER).expect("key part");
    let mismatched = format!("{certificate_only}{KEY_MARKER}{other_key}");
    for bad in ["not a certificate", certificate_only, &mismatched] {
        let (status, answer) = reconfigure_with_body(
            &proxy,
            "serviceName=shop&servicePath=/&serviceDomain=shop.example.test",
            bad,
        )
        .await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{answer}");
        let message = answer["Message"].as_str().unwrap_or_default();
        assert!(message.contains("serviceCert"), "{message}");
        proxy.assert_unchanged_since(&before).await;
        assert_eq!(proxy.stored_spec("shop").await, stored_before);
        assert!(listed_cert_names(&proxy).await.is_empty());
    }
    // The PEM given twice (query and body) is refused too.
    let pem = ca.bundle(&["shop.example.test"]);
    let query = serde_urlencoded::to_string([
        ("serviceName", "shop"),
        ("servicePath", "/"),
        ("serviceCert", pem.as_str()),
    ])
    .expect("query");
    let (status, answer) = reconfigure_with_body(&proxy, &query, &pem).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{answer}");
    assert!(answer["Message"]
        .as_str()
        .unwrap_or_default()
        .contains("serviceCert"));
    proxy.assert_unchanged_since(&before).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_client_ssl_needs_the_ca_file_and_a_service_domain() {
    let proxy = TestProxy::spawn().await;
    let (status, answer) = proxy
        .reconfigure("serviceName=secure&serviceDomain=secure.example.test&verifyClientSsl=true")
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{answer}");
    let message = answer["Message"].as_str().unwrap_or_default();
    assert!(
        message.contains("verifyClientSsl") && message.contains("--ca-file"),
        "{message}"
    );

    let ca = TestCa::new();
    let directory = tempfile::tempdir().expect("temporary directory");
    let ca_file = write_ca_file(directory.path(), &ca);
    let proxy = TestProxy::spawn_with(|settings| settings.ca_file = Some(ca_file)).await;
    let (status, answer) = proxy
        .reconfigure("serviceName=secure&servicePath=/&verifyClientSsl=true")
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{answer}");
    let message = answer["Message"].as_str().unwrap_or_default();
    assert!(
        message.contains("verifyClientSsl") && message.contains("serviceDomain"),
        "{message}"
    );
    assert!(proxy.services().await.as_array().is_some_and(Vec::is_empty));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_client_ssl_requires_a_client_certificate_signed_by_the_ca_file() {
    let ca = TestCa::new();
    let stranger = TestCa::new();
    let directory = tempfile::tempdir().expect("temporary directory");
    let ca_file = write_ca_file(directory.path(), &ca);
    let secure_backend = spawn_backend("secure").await;
    let open_backend = spawn_backend("open").await;
    let proxy = TestProxy::spawn_with(|settings| settings.ca_file = Some(ca_file)).await;
    proxy
        .register_instance("secure", "secure-1", secure_backend.port)
        .await;
    proxy
        .register_instance("open", "open-1", open_backend.port)
        .await;

    // One certificate names both services: the SNI line of the secure one must still win.
    let (status, answer) = put_cert(
        &proxy,
        "shared",
        &ca.bundle(&["secure.example.test", "open.example.test"]),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    proxy
        .reconfigure_ok("serviceName=secure&serviceDomain=secure.example.test&verifyClientSsl=true")
        .await;
    proxy
        .reconfigure_ok("serviceName=open&serviceDomain=open.example.test")
        .await;
    // The CA is copied into the data directory (owner-only, content-addressed) and the
    // crt-list names that copy, never the file given to --ca-file.
    let config = proxy.config().await;
    assert!(!config.contains(&directory.path().display().to_string()));
    let certs_dir = proxy.data_dir().join("certs");
    let names: Vec<String> = std::fs::read_dir(&certs_dir)
        .expect("certs directory")
        .filter_map(|entry| entry.ok())
        .map(|entry| entry.file_name().to_string_lossy().into_owned())
        .collect();
    let ca_copy = names
        .iter()
        .find(|name| name.starts_with("ca-") && name.ends_with(".pem"))
        .unwrap_or_else(|| panic!("a copy of the CA in {names:?}"));
    let mode = std::fs::metadata(certs_dir.join(ca_copy))
        .expect("CA copy")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    let list = names
        .iter()
        .find(|name| name.starts_with("crt-list-"))
        .expect("a crt-list");
    let list = std::fs::read_to_string(certs_dir.join(list)).expect("crt-list");
    assert!(
        list.lines()
            .next()
            .is_some_and(|line| line.ends_with(&format!(
                "[verify required ca-file certs/{ca_copy}] secure.example.test"
            ))),
        "{list}"
    );

    let port = https_port(&proxy);
    let host = "secure.example.test";
    let client = ca.bundle(&["client.example.test"]);
    let foreign_client = stranger.bundle(&["client.example.test"]);

    let refused = https_status(port, host, host, &ca.root, None).await;
    assert!(refused.is_err(), "no client certificate: {refused:?}");
    let refused = https_status(port, host, host, &ca.root, Some(&foreign_client)).await;
    assert!(refused.is_err(), "another CA's certificate: {refused:?}");
    assert_eq!(
        https_status(port, host, host, &ca.root, Some(&client)).await,
        Ok((200, "secure /".to_string()))
    );

    // The other service on the same frontend asks for nothing.
    let open = "open.example.test";
    assert_eq!(
        https_status(port, open, open, &ca.root, None).await,
        Ok((200, "open /".to_string()))
    );
    // A connection made for the open name cannot reach the secure service by its Host header,
    // and neither can plain HTTP.
    let crossed = https_status(port, open, host, &ca.root, None).await;
    assert!(matches!(crossed, Ok((403, _))), "{crossed:?}");
    let plain = http_request(proxy.settings().http_port, "GET", "/", host, &[]).await;
    assert_eq!(plain.status, 403);
    let plain_open = http_request(proxy.settings().http_port, "GET", "/", open, &[]).await;
    assert_eq!(
        (plain_open.status, plain_open.body.as_str()),
        (200, "open /")
    );
}

/// A backend that speaks TLS only (a self-signed rcgen certificate): it answers
/// `<name> <path>` to each request, and closes a connection that does not start with a handshake.
async fn spawn_self_signed_tls_backend(name: &'static str) -> TlsBackend {
    let key = rcgen::KeyPair::generate().expect("key");
    let certificate = rcgen::CertificateParams::new(vec!["backend.internal".to_string()])
        .expect("params")
        .self_signed(&key)
        .expect("self-signed");
    let pem = format!("{}{}", certificate.pem(), key.serialize_pem());
    spawn_tls_backend(name, &pem).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ssl_verify_none_reaches_instances_that_speak_tls_only() {
    let backend = spawn_self_signed_tls_backend("tls-app").await;
    let proxy = TestProxy::spawn().await;
    proxy
        .register_instance("tls-app", "tls-app-1", backend.port)
        .await;

    // Without sslVerifyNone HAProxy speaks plain HTTP to it and gets no answer.
    proxy
        .reconfigure_ok("serviceName=tls-app&servicePath=/secure&skipCheck=true")
        .await;
    let (status, _) = proxy.get_through_proxy("/secure/x", None).await;
    assert_ne!(status, StatusCode::OK);

    proxy
        .reconfigure_ok("serviceName=tls-app&servicePath=/secure&sslVerifyNone=true")
        .await;
    assert_eq!(
        proxy.get_through_proxy("/secure/x", None).await,
        (StatusCode::OK, "tls-app /secure/x".to_string())
    );
    let stored = proxy.stored_spec("tls-app").await.expect("stored");
    assert_eq!(stored["SslVerifyNone"], true, "{stored}");
}
