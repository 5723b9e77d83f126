//! ACME: a domain routed with `letsEncrypt=true` gets a certificate from Pebble (Let's Encrypt's
//! test ACME server, Debian's `pebble` package) without any other call. Pebble resolves every
//! name to 127.0.0.1 through `pebble-challtestsrv`'s DNS and really fetches the HTTP-01 challenge
//! from flow-proxy's HAProxy port; the certificate is checked with a TLS client that trusts only
//! Pebble's root.

use std::net::Ipv4Addr;
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use reqwest::StatusCode;
use rustls::pki_types::CertificateDer;
use serde_json::Value;
use tokio::process::{Child, Command};

use crate::fleet::{eventually, SharedRegistry};
use crate::helpers::{free_port, spawn_backend, Backend, TestProxy};
use crate::tls::{
    client_config, https_request, put_cert, reconfigure_with_body, tls_connect, TestCa,
};

/// Pebble and its DNS server on loopback, validating HTTP-01 on `http_port`.
struct Pebble {
    _pebble: Child,
    _dns: Child,
    dns_management_port: u16,
    management_port: u16,
    /// The directory URL.
    directory: String,
    /// The CA of Pebble's own HTTPS (for `--acme-ca-file`), as a PEM file.
    ca_file: std::path::PathBuf,
    ca: TestCa,
    _dir: tempfile::TempDir,
}

fn require_pebble() {
    for tool in ["pebble", "pebble-challtestsrv"] {
        let found = std::process::Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .output();
        assert!(
            matches!(found, Ok(ref output) if output.status.success()),
            "{tool} is not installed: the ACME tests run Let's Encrypt's Pebble. Run \
             scripts/install-pebble.sh (or `apt-get install pebble`)."
        );
    }
}

impl Pebble {
    /// Starts Pebble issuing certificates valid for `validity_seconds`.
    async fn start(http_port: u16, validity_seconds: u64) -> Pebble {
        require_pebble();
        let dir = tempfile::tempdir().expect("pebble directory");
        let ca = TestCa::new();
        let bundle = ca.bundle(&["localhost"]);
        let split = bundle
            .find("-----BEGIN PRIVATE KEY")
            .expect("key in bundle");
        write(dir.path(), "cert.pem", &bundle[..split]);
        write(dir.path(), "key.pem", &bundle[split..]);
        let ca_pem = pem::encode(&pem::Pem::new("CERTIFICATE", ca.root.to_vec()));
        let ca_file = dir.path().join("ca.pem");
        write(dir.path(), "ca.pem", &ca_pem);

        // A port picked free may be taken before Pebble binds it: then start again on others.
        let mut attempt = 0;
        let (dns, pebble, dns_management_port, listen_port, management_port) = loop {
            attempt += 1;
            let (mut dns, mut pebble, ports, dns_management_port, listen_port, management_port) = {
                let dns_port = free_port();
                let dns_management_port = free_port();
                let dns = Command::new("pebble-challtestsrv")
                    .args([
                        "-defaultIPv4",
                        "127.0.0.1",
                        "-defaultIPv6",
                        "",
                        "-dns01",
                        &format!("127.0.0.1:{dns_port}"),
                        "-http01",
                        "",
                        "-https01",
                        "",
                        "-tlsalpn01",
                        "",
                        "-management",
                        &format!("127.0.0.1:{dns_management_port}"),
                    ])
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .kill_on_drop(true)
                    .spawn()
                    .expect("pebble-challtestsrv starts");

                let listen_port = free_port();
                let management_port = free_port();
                let config = serde_json::json!({
                    "pebble": {
                        "listenAddress": format!("127.0.0.1:{listen_port}"),
                        "managementListenAddress": format!("127.0.0.1:{management_port}"),
                        "certificate": dir.path().join("cert.pem"),
                        "privateKey": dir.path().join("key.pem"),
                        "httpPort": http_port,
                        "tlsPort": free_port(),
                        "ocspResponderURL": "",
                        "externalAccountBindingRequired": false,
                        "certificateValidityPeriod": validity_seconds,
                    }
                });
                write(dir.path(), "pebble.json", &config.to_string());
                let pebble = Command::new("pebble")
                    .arg("-config")
                    .arg(dir.path().join("pebble.json"))
                    .arg("-dnsserver")
                    .arg(format!("127.0.0.1:{dns_port}"))
                    // No random sleeps before validating, no refused nonces: the test stays quick.
                    .env("PEBBLE_VA_NOSLEEP", "1")
                    .env("PEBBLE_WFE_NONCEREJECT", "0")
                    .env("PEBBLE_AUTHZREUSE", "0")
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .kill_on_drop(true)
                    .spawn()
                    .expect("pebble starts");
                (
                    dns,
                    pebble,
                    [dns_management_port, listen_port, management_port],
                    dns_management_port,
                    listen_port,
                    management_port,
                )
            };
            if listening(&mut [&mut dns, &mut pebble], &ports).await {
                break (
                    dns,
                    pebble,
                    dns_management_port,
                    listen_port,
                    management_port,
                );
            }
            assert!(
                attempt < 3,
                "pebble or pebble-challtestsrv did not start (3 attempts)"
            );
        };
        Pebble {
            _pebble: pebble,
            _dns: dns,
            dns_management_port,
            management_port,
            directory: format!("https://localhost:{listen_port}/dir"),
            ca_file,
            ca,
            _dir: dir,
        }
    }

    /// Pebble's root (it makes a new one at each start), from its management endpoint.
    async fn root(&self) -> CertificateDer<'static> {
        let answer = https_request(
            self.management_port,
            &self.ca.root,
            "GET",
            "/roots/0",
            "localhost",
            &[],
        )
        .await;
        assert_eq!(answer.status, 200, "{}", answer.body);
        let parsed = pem::parse(answer.body.trim()).expect("Pebble's root is PEM");
        CertificateDer::from(parsed.contents().to_vec())
    }

    /// Makes Pebble's DNS answer `address` for `host` (the other names stay 127.0.0.1).
    async fn resolve(&self, host: &str, address: &str) {
        let response = reqwest::Client::new()
            .post(format!(
                "http://127.0.0.1:{}/add-a",
                self.dns_management_port
            ))
            .json(&serde_json::json!({ "host": host, "addresses": [address] }))
            .send()
            .await
            .expect("challtestsrv answers");
        assert!(response.status().is_success());
    }

    /// The flags of a proxy ordering from this Pebble.
    fn flags(&self, settings: &mut flow_proxy::settings::Settings) {
        settings.acme.acme_directory = self.directory.clone();
        settings.acme.acme_accept_terms = true;
        settings.acme.acme_email = Some("ops@example.com".into());
        settings.acme.acme_ca_file = Some(self.ca_file.clone());
        settings.acme.acme_check_interval = 1;
    }
}

fn write(dir: &Path, name: &str, text: &str) {
    std::fs::write(dir.join(name), text).expect("write pebble file");
}

/// Whether every one of `ports` is listened on within 20 s, while none of `children` exited.
async fn listening(children: &mut [&mut Child], ports: &[u16]) -> bool {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    for &port in ports {
        loop {
            if tokio::net::TcpStream::connect((Ipv4Addr::LOCALHOST, port))
                .await
                .is_ok()
            {
                break;
            }
            let exited = children
                .iter_mut()
                .any(|child| !matches!(child.try_wait(), Ok(None)));
            if exited || tokio::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    true
}

/// The fingerprint of the certificate HAProxy's HTTPS port serves for `sni`, when a client
/// trusting only `root` accepts it.
async fn trusted_fingerprint(
    https_port: u16,
    sni: &str,
    root: &CertificateDer<'static>,
) -> Option<String> {
    let stream = tls_connect(https_port, sni, client_config(root, &[b"http/1.1"]))
        .await
        .ok()?;
    let (_, session) = stream.get_ref();
    let leaf = session.peer_certificates()?.first()?;
    use sha2::Digest;
    Some(
        sha2::Sha256::digest(leaf.as_ref())
            .iter()
            .map(|byte| format!("{byte:02x}"))
            .collect(),
    )
}

/// Waits (60 s at most) until HAProxy serves `sni` a certificate trusted by `root`; its
/// fingerprint.
async fn wait_for_trusted(https_port: u16, sni: &str, root: &CertificateDer<'static>) -> String {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(fingerprint) = trusted_fingerprint(https_port, sni, root).await {
            return fingerprint;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no certificate trusted by Pebble's root served for {sni} within 60 s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// How many certificates `proxy` ordered successfully (`flow_proxy_acme_orders_total`).
async fn issued_orders(proxy: &TestProxy) -> u64 {
    let metrics = proxy
        .http()
        .get(proxy.api("/metrics"))
        .send()
        .await
        .expect("the API answers")
        .text()
        .await
        .expect("metrics text");
    metrics
        .lines()
        .find_map(|line| line.strip_prefix("flow_proxy_acme_orders_total{result=\"ok\"} "))
        .map_or(0, |count| count.trim().parse().expect("a count"))
}

async fn acme_status(proxy: &TestProxy, domain: &str) -> Option<Value> {
    let (status, body) = proxy.api_get("/v1/docker-flow-proxy/certs").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    body["Acme"]
        .as_array()?
        .iter()
        .find(|entry| entry["Domain"] == domain)
        .cloned()
}

/// Pebble issuing certificates valid `validity` seconds, and a proxy with ACME on routing service
/// `name` (one instance) on `/` of `<name>.acme.test` with `letsEncrypt=true`.
async fn pebble_and_proxy_routing(
    name: &'static str,
    validity: u64,
) -> (Pebble, TestProxy, Backend) {
    let http_port = free_port();
    let pebble = Pebble::start(http_port, validity).await;
    let backend = spawn_backend(name).await;
    let proxy = TestProxy::spawn_with(|settings| {
        settings.http_port = http_port;
        pebble.flags(settings);
    })
    .await;
    proxy
        .register_instance(name, &format!("{name}-1"), backend.port)
        .await;
    proxy
        .reconfigure_ok(&format!(
            "serviceName={name}&servicePath=/&serviceDomain={name}.acme.test&letsEncrypt=true"
        ))
        .await;
    (pebble, proxy, backend)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lets_encrypt_domain_gets_a_certificate_a_client_trusting_pebble_accepts() {
    let (pebble, proxy, _backend) = pebble_and_proxy_routing("shop", 3600).await;

    let root = pebble.root().await;
    let https_port = proxy.settings().https_port;
    eventually(
        "HAProxy serves shop.acme.test a certificate Pebble issued",
        Duration::from_secs(60),
        || {
            let root = root.clone();
            async move {
                trusted_fingerprint(https_port, "shop.acme.test", &root)
                    .await
                    .is_some()
            }
        },
    )
    .await;
    let answer = https_request(https_port, &root, "GET", "/cart", "shop.acme.test", &[]).await;
    assert_eq!((answer.status, answer.body.as_str()), (200, "shop /cart"));

    // /certs: the certificate under its ACME name, and the domain's last attempt succeeded.
    eventually(
        "/certs lists the ACME certificate and its last attempt",
        Duration::from_secs(10),
        || async {
            let (_, body) = proxy.api_get("/v1/docker-flow-proxy/certs").await;
            body["Certs"][0]["LastOutcome"] == "ok"
        },
    )
    .await;
    let (_, body) = proxy.api_get("/v1/docker-flow-proxy/certs").await;
    let names: Vec<&str> = body["Certs"]
        .as_array()
        .expect("Certs")
        .iter()
        .filter_map(|cert| cert["Name"].as_str())
        .collect();
    assert_eq!(names, ["acme.shop.acme.test"], "{body}");
    let cert = &body["Certs"][0];
    assert_eq!(cert["ManagedByAcme"], true, "{cert}");
    assert!(
        cert["NotAfter"].is_string() && cert["RenewAfter"].is_string(),
        "{cert}"
    );
    assert!(cert["LastAttempt"].is_string(), "{cert}");
    let status = acme_status(&proxy, "shop.acme.test")
        .await
        .expect("ACME status");
    assert_eq!(status["LastOutcome"], "ok", "{status}");

    // The account key is kept in KV, never shown.
    let account: Value = reqwest::get(format!(
        "http://{}/v1/kv/flow-proxy/acme/account?raw",
        proxy.registry_address()
    ))
    .await
    .expect("the registry answers")
    .json()
    .await
    .expect("the account is stored as JSON");
    let key = account["key_pkcs8"].as_str().expect("the key");
    assert!(!body.to_string().contains(key));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_short_lived_certificate_is_renewed_before_it_expires_without_a_call() {
    // Renewal is due two thirds in: after 10 of these 15 seconds.
    let (pebble, proxy, _backend) = pebble_and_proxy_routing("blog", 15).await;
    let root = pebble.root().await;
    let https_port = proxy.settings().https_port;
    let first = wait_for_trusted(https_port, "blog.acme.test", &root).await;
    eventually(
        "a renewed certificate replaces the first one",
        Duration::from_secs(40),
        || {
            let root = root.clone();
            let first = first.clone();
            async move {
                trusted_fingerprint(https_port, "blog.acme.test", &root)
                    .await
                    .is_some_and(|now| now != first)
            }
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_domain_whose_challenge_fails_is_reported_and_retried_while_others_get_theirs() {
    let http_port = free_port();
    let pebble = Pebble::start(http_port, 3600).await;
    // Nothing listens on 127.0.0.2: Pebble cannot fetch this domain's challenge.
    pebble.resolve("broken.acme.test", "127.0.0.2").await;
    let backend = spawn_backend("app").await;
    let proxy = TestProxy::spawn_with(|settings| {
        settings.http_port = http_port;
        pebble.flags(settings);
    })
    .await;
    proxy.register_instance("app", "app-1", backend.port).await;
    proxy
        .reconfigure_ok(
            "serviceName=broken&servicePath=/&serviceDomain=broken.acme.test&letsEncrypt=true",
        )
        .await;
    proxy
        .reconfigure_ok(
            "serviceName=app&servicePath=/&serviceDomain=good.acme.test&letsEncrypt=true",
        )
        .await;

    let root = pebble.root().await;
    let https_port = proxy.settings().https_port;
    eventually(
        "good.acme.test gets its certificate",
        Duration::from_secs(60),
        || {
            let root = root.clone();
            async move {
                trusted_fingerprint(https_port, "good.acme.test", &root)
                    .await
                    .is_some()
            }
        },
    )
    .await;
    eventually(
        "broken.acme.test is reported failing, and retried",
        Duration::from_secs(60),
        || async {
            acme_status(&proxy, "broken.acme.test")
                .await
                .is_some_and(|status| {
                    status["LastOutcome"]
                        .as_str()
                        .is_some_and(|outcome| outcome.starts_with("error"))
                        && status["Failures"]
                            .as_u64()
                            .is_some_and(|failures| failures >= 2)
                        && status["NextAttempt"].is_string()
                })
        },
    )
    .await;
    let metrics = proxy
        .http()
        .get(proxy.api("/metrics"))
        .send()
        .await
        .expect("the API answers")
        .text()
        .await
        .expect("metrics text");
    assert!(
        metrics.contains("flow_proxy_acme_orders_total{result=\"error\"}"),
        "{metrics}"
    );
    assert!(
        metrics.contains("flow_proxy_acme_orders_total{result=\"ok\"} 1"),
        "{metrics}"
    );
    // Routing changes still go through while it fails.
    proxy
        .reconfigure_ok("serviceName=app&servicePath=/&serviceDomain=good.acme.test&letsEncrypt=true&reqMode=http")
        .await;
    let answer = https_request(https_port, &root, "GET", "/x", "good.acme.test", &[]).await;
    assert_eq!((answer.status, answer.body.as_str()), (200, "app /x"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_proxies_sharing_the_registry_order_a_domain_once_and_both_serve_it() {
    let registry = SharedRegistry::start().await;
    let first_http_port = free_port();
    // Pebble validates on the first proxy's port whichever proxy ordered: the token is in KV.
    let pebble = Pebble::start(first_http_port, 3600).await;
    let backend = spawn_backend("shop").await;
    let fleet_flags = |settings: &mut flow_proxy::settings::Settings| {
        settings.consul_address = vec![registry.address()];
        pebble.flags(settings);
    };
    let first = TestProxy::spawn_with(|settings| {
        fleet_flags(settings);
        settings.http_port = first_http_port;
    })
    .await;
    let second = TestProxy::spawn_with(fleet_flags).await;
    registry
        .register_instance("shop", "shop-1", backend.port)
        .await;
    first
        .reconfigure_ok(
            "serviceName=shop&servicePath=/&serviceDomain=shop.acme.test&letsEncrypt=true",
        )
        .await;

    let root = pebble.root().await;
    let mut served = Vec::new();
    for proxy in [&first, &second] {
        served.push(wait_for_trusted(proxy.settings().https_port, "shop.acme.test", &root).await);
    }
    assert_eq!(
        served[0], served[1],
        "both serve the one certificate ordered"
    );
    // Nobody orders it again: the same certificate stays, and one account exists.
    tokio::time::sleep(Duration::from_secs(3)).await;
    for proxy in [&first, &second] {
        let now = trusted_fingerprint(proxy.settings().https_port, "shop.acme.test", &root).await;
        assert_eq!(now.as_deref(), Some(served[0].as_str()));
    }
    let mut orders = 0;
    for proxy in [&first, &second] {
        orders += issued_orders(proxy).await;
    }
    assert_eq!(orders, 1, "the fleet ordered the certificate once");
    // One account: its key was written once (create-only), never replaced.
    let account: Value = reqwest::get(format!("{}/v1/kv/flow-proxy/acme/account", registry.url()))
        .await
        .expect("the registry answers")
        .json()
        .await
        .expect("a KV entry");
    assert!(account[0]["CreateIndex"].is_u64(), "{account}");
    assert_eq!(
        account[0]["CreateIndex"], account[0]["ModifyIndex"],
        "{account}"
    );
    // The challenge answered, its token is gone from KV.
    assert_eq!(
        registry.kv_keys("flow-proxy/acme/challenges/").await,
        Vec::<String>::new()
    );
    let keys = registry.kv_keys("flow-proxy/certs/").await;
    assert_eq!(keys, ["flow-proxy/certs/acme.shop.acme.test"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_acme_all_domains_every_exact_domain_gets_a_certificate_and_none_without_terms() {
    let http_port = free_port();
    let pebble = Pebble::start(http_port, 3600).await;
    let backend = spawn_backend("docs").await;
    let proxy = TestProxy::spawn_with(|settings| {
        settings.http_port = http_port;
        pebble.flags(settings);
        settings.acme.acme_all_domains = true;
    })
    .await;
    proxy
        .register_instance("docs", "docs-1", backend.port)
        .await;
    proxy
        .reconfigure_ok("serviceName=docs&servicePath=/&serviceDomain=docs.acme.test")
        .await;
    let root = pebble.root().await;
    wait_for_trusted(proxy.settings().https_port, "docs.acme.test", &root).await;

    // Without --acme-accept-terms nothing is ordered and no challenge route exists.
    let off = TestProxy::spawn_with(|settings| {
        pebble.flags(settings);
        settings.acme.acme_accept_terms = false;
    })
    .await;
    off.register_instance("docs", "docs-1", backend.port).await;
    off.reconfigure_ok(
        "serviceName=docs&servicePath=/&serviceDomain=docs.acme.test&letsEncrypt=true",
    )
    .await;
    assert!(!off.config().await.contains("flow_proxy_acme"));
    let (_, body) = off.api_get("/v1/docker-flow-proxy/certs").await;
    assert_eq!(body["Certs"], serde_json::json!([]), "{body}");
    assert_eq!(body["Acme"], serde_json::json!([]), "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uploads_may_not_take_the_names_of_acme_certificates() {
    let proxy = TestProxy::spawn().await;
    let ca = TestCa::new();
    let pem = ca.bundle(&["shop.example.com"]);
    let (status, body) = put_cert(&proxy, "acme.shop.example.com", &pem).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert!(
        body["Message"]
            .as_str()
            .is_some_and(|m| m.contains("certName")),
        "{body}"
    );
    let backend = spawn_backend("shop").await;
    proxy
        .register_instance("acme.shop", "acme.shop-1", backend.port)
        .await;
    let (status, body) =
        reconfigure_with_body(&proxy, "serviceName=acme.shop&servicePath=/shop", &pem).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert!(
        body["Message"]
            .as_str()
            .is_some_and(|m| m.contains("serviceCert")),
        "{body}"
    );
    let (status, listed) = proxy.api_get("/v1/docker-flow-proxy/certs").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(listed["Certs"], serde_json::json!([]), "{listed}");
}
