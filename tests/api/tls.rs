//! TLS for tests: a test CA (rcgen) that signs certificates, and a real TLS client (rustls)
//! that trusts only that CA, for requests to HAProxy's HTTPS frontend.

use std::net::Ipv4Addr;
use std::sync::Arc;

use reqwest::StatusCode;
use rustls::pki_types::{CertificateDer, ServerName};
use serde_json::Value;

use crate::helpers::TestProxy;

/// A test CA and certificates it signs.
pub struct TestCa {
    issuer: rcgen::Issuer<'static, rcgen::KeyPair>,
    pub root: CertificateDer<'static>,
}

impl TestCa {
    pub fn new() -> TestCa {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("CA params");
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "flow-proxy test CA");
        let key = rcgen::KeyPair::generate().expect("CA key");
        let certificate = params.self_signed(&key).expect("CA certificate");
        TestCa {
            root: certificate.der().clone(),
            issuer: rcgen::Issuer::new(params, key),
        }
    }

    /// A PEM bundle (certificate then key) for `names`, signed by this CA.
    pub fn bundle(&self, names: &[&str]) -> String {
        let params = rcgen::CertificateParams::new(
            names
                .iter()
                .map(|name| name.to_string())
                .collect::<Vec<_>>(),
        )
        .expect("params");
        let key = rcgen::KeyPair::generate().expect("key");
        let certificate = params.signed_by(&key, &self.issuer).expect("signed");
        format!("{}{}", certificate.pem(), key.serialize_pem())
    }
}

/// A rustls client trusting only `root`, offering `alpn`.
pub fn client_config(root: &CertificateDer<'static>, alpn: &[&[u8]]) -> rustls::ClientConfig {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(root.clone()).expect("CA root");
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("protocol versions")
    .with_root_certificates(roots)
    .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|protocol| protocol.to_vec()).collect();
    config
}

/// A TLS connection to HAProxy on 127.0.0.1:`port` with SNI `sni`.
pub async fn tls_connect(
    port: u16,
    sni: &str,
    config: rustls::ClientConfig,
) -> std::io::Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>> {
    let tcp = tokio::net::TcpStream::connect((Ipv4Addr::LOCALHOST, port)).await?;
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let name = ServerName::try_from(sni.to_string()).expect("SNI name");
    connector.connect(name, tcp).await
}

/// Stores `pem` as certificate `name` through the API.
pub async fn put_cert(proxy: &TestProxy, name: &str, pem: &str) -> (StatusCode, Value) {
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

/// `PUT /reconfigure?<query>` with `body` (a `serviceCert` bundle).
pub async fn reconfigure_with_body(
    proxy: &TestProxy,
    query: &str,
    body: &str,
) -> (StatusCode, Value) {
    let response = proxy
        .http()
        .put(proxy.api(&format!("/v1/docker-flow-proxy/reconfigure?{query}")))
        .body(body.to_string())
        .send()
        .await
        .expect("the API answers");
    let status = response.status();
    (status, response.json().await.expect("JSON answer"))
}

/// An HTTP/1.1 answer read off the wire: status, headers (names lowercased) and body.
#[derive(Debug)]
pub struct RawAnswer {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl RawAnswer {
    /// The value of header `name` (case-insensitive), if present.
    pub fn header(&self, name: &str) -> Option<&str> {
        let name = name.to_ascii_lowercase();
        self.headers
            .iter()
            .find(|(key, _)| *key == name)
            .map(|(_, value)| value.as_str())
    }
}

/// Sends `method path` with `Host: host` and `headers`, `Connection: close`, over `stream`
/// (plain TCP or TLS) and reads the whole answer.
pub async fn exchange<S>(
    mut stream: S,
    method: &str,
    path: &str,
    host: &str,
    headers: &[(&str, &str)],
) -> RawAnswer
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut request = format!("{method} {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n");
    for (name, value) in headers {
        request.push_str(&format!("{name}: {value}\r\n"));
    }
    request.push_str("\r\n");
    stream.write_all(request.as_bytes()).await.expect("send");
    let mut answer = Vec::new();
    // HAProxy may close a TLS connection without close_notify: what was read is the answer.
    let _ = tokio::time::timeout(
        std::time::Duration::from_secs(10),
        stream.read_to_end(&mut answer),
    )
    .await
    .expect("HAProxy answers within 10 s");
    let answer = String::from_utf8_lossy(&answer).into_owned();
    let (head, body) = answer.split_once("\r\n\r\n").unwrap_or((&answer, ""));
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|line| line.split(' ').nth(1))
        .and_then(|code| code.parse().ok())
        .unwrap_or_else(|| panic!("an HTTP status line: {answer:?}"));
    let headers = lines
        .filter_map(|line| line.split_once(':'))
        .map(|(name, value)| (name.trim().to_ascii_lowercase(), value.trim().to_string()))
        .collect();
    RawAnswer {
        status,
        headers,
        body: body.to_string(),
    }
}

/// `exchange` over plain TCP to 127.0.0.1:`port`.
pub async fn http_request(
    port: u16,
    method: &str,
    path: &str,
    host: &str,
    headers: &[(&str, &str)],
) -> RawAnswer {
    let stream = tokio::net::TcpStream::connect((Ipv4Addr::LOCALHOST, port))
        .await
        .expect("HAProxy listens");
    exchange(stream, method, path, host, headers).await
}

/// `exchange` over TLS to 127.0.0.1:`port`, SNI `host`, trusting only `root`.
pub async fn https_request(
    port: u16,
    root: &CertificateDer<'static>,
    method: &str,
    path: &str,
    host: &str,
    headers: &[(&str, &str)],
) -> RawAnswer {
    let stream = tls_connect(port, host, client_config(root, &[b"http/1.1"]))
        .await
        .unwrap_or_else(|error| panic!("TLS handshake with {host}: {error}"));
    exchange(stream, method, path, host, headers).await
}

/// A backend serving TLS on 127.0.0.1:`port`; stops when dropped.
pub struct TlsBackend {
    pub port: u16,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for TlsBackend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A backend that terminates TLS itself with `pem` (certificate then key, from the test CA) and
/// answers `<name> <path>` to one request per connection.
pub async fn spawn_tls_backend(name: &'static str, pem: &str) -> TlsBackend {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let certificates: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<_, _>>()
        .expect("certificate PEM");
    let key = PrivateKeyDer::from_pem_slice(pem.as_bytes()).expect("key PEM");
    let config = rustls::ServerConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("protocol versions")
    .with_no_client_auth()
    .with_single_cert(certificates, key)
    .expect("server config");
    let acceptor = tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(config));
    let listener = tokio::net::TcpListener::bind((std::net::Ipv4Addr::LOCALHOST, 0))
        .await
        .expect("bind backend");
    let port = listener.local_addr().expect("address").port();
    let task = tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(mut stream) = acceptor.accept(tcp).await else {
                    return;
                };
                let mut request = Vec::new();
                let mut buffer = [0u8; 4096];
                while !request.windows(4).any(|window| window == b"\r\n\r\n") {
                    match stream.read(&mut buffer).await {
                        Ok(0) | Err(_) => return,
                        Ok(read) => request.extend_from_slice(&buffer[..read]),
                    }
                }
                let text = String::from_utf8_lossy(&request).into_owned();
                let path = text.split(' ').nth(1).unwrap_or("?").to_string();
                let body = format!("{name} {path}");
                let answer = format!(
                    "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = stream.write_all(answer.as_bytes()).await;
                let _ = stream.shutdown().await;
            });
        }
    });
    TlsBackend { port, task }
}
