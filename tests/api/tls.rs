//! TLS for tests: a throwaway CA (rcgen) that signs certificates, and a rustls client that
//! trusts only it, for real handshakes with HAProxy's HTTPS frontend.

use std::net::Ipv4Addr;
use std::sync::Arc;

use rustls::pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

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

/// A TLS client trusting only `root`, offering `alpn`.
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

/// A TLS connection to 127.0.0.1:`port` with `sni`.
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

/// Sends `request` (a complete HTTP/1.1 request, `Connection: close`) over TLS to
/// 127.0.0.1:`port` with `sni`, trusting only `root`; returns the status line, the headers
/// and the body as text.
pub async fn https_exchange(
    port: u16,
    sni: &str,
    request: &str,
    root: &CertificateDer<'static>,
) -> (String, String, String) {
    let mut stream = tls_connect(port, sni, client_config(root, &[b"http/1.1"]))
        .await
        .unwrap_or_else(|error| panic!("TLS handshake with {sni}: {error}"));
    stream.write_all(request.as_bytes()).await.expect("send");
    let mut answer = Vec::new();
    // HAProxy may close without close_notify: what was read is the answer.
    let _ = stream.read_to_end(&mut answer).await;
    let answer = String::from_utf8_lossy(&answer).into_owned();
    let (head, body) = answer.split_once("\r\n\r\n").unwrap_or((&answer, ""));
    let (status_line, headers) = head.split_once("\r\n").unwrap_or((head, ""));
    (
        status_line.to_string(),
        headers.to_string(),
        body.to_string(),
    )
}
