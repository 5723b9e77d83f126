//! Basic auth for services: `users` (clear or, with `usersPassEncrypted`, crypt hashes),
//! `--users` for every service and `ignoreAuthorization` for one destination. Every request goes
//! through the real HAProxy to a real backend that reports the `Authorization` header it got;
//! passwords must show up nowhere: not in `/config`, `/services`, KV, answers, haproxy.cfg or
//! the log.

use std::net::Ipv4Addr;
use std::time::Duration;

use flow_proxy::settings::Secret;
use reqwest::StatusCode;

use crate::fleet::{eventually, ProxyOptions, ProxyProcess, SharedRegistry};
use crate::helpers::TestProxy;
use crate::proxy_client::ProxyClient;
use crate::tls::{https_request, put_cert, TestCa};

/// `secret` under SHA-512 crypt (`openssl passwd -6 -salt saltsalt secret`).
const SECRET_SHA512: &str =
    "$6$saltsalt$TVLlQcbpFVof5W3Yz4DTP6gRstiNuHwwTt6GLc1E5n0U0aDehy0S5knV8wiOQSpT0Y77vwPZN.Pq.H91p5hVO1";

/// A backend on 127.0.0.1 that answers `<name> authorization=<header or none>`.
struct AuthEchoBackend {
    port: u16,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for AuthEchoBackend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn spawn_auth_echo(name: &str) -> AuthEchoBackend {
    let listener = tokio::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .await
        .expect("bind backend");
    let port = listener.local_addr().expect("backend address").port();
    let name = name.to_string();
    let app = axum::Router::new().fallback(move |headers: axum::http::HeaderMap| {
        let name = name.clone();
        async move {
            let authorization = headers
                .get(axum::http::header::AUTHORIZATION)
                .map_or("none".to_string(), |value| {
                    value.to_str().unwrap_or("?").to_string()
                });
            format!("{name} authorization={authorization}")
        }
    });
    let task = tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    AuthEchoBackend { port, task }
}

/// What a client gets for `GET path` through HAProxy, with basic-auth credentials when given:
/// the status, the `WWW-Authenticate` header and the body.
struct Answer {
    status: StatusCode,
    challenge: Option<String>,
    body: String,
}

async fn get_as(proxy: &ProxyClient, path: &str, credentials: Option<(&str, &str)>) -> Answer {
    let mut request = proxy
        .http()
        .get(format!("http://127.0.0.1:{}{path}", proxy.http_port));
    if let Some((user, password)) = credentials {
        request = request.basic_auth(user, Some(password));
    }
    let response = request
        .send()
        .await
        .unwrap_or_else(|error| panic!("HAProxy answers GET {path}: {error}"));
    Answer {
        status: response.status(),
        challenge: response
            .headers()
            .get(reqwest::header::WWW_AUTHENTICATE)
            .map(|value| value.to_str().expect("ASCII challenge").to_string()),
        body: response.text().await.expect("body"),
    }
}

/// Asserts that `secret` is nowhere a user of the API or of Consul could read it.
async fn assert_not_shown(proxy: &ProxyClient, stored: Option<serde_json::Value>, secret: &str) {
    let config = proxy.config().await;
    assert!(!config.contains(secret), "/config shows it:\n{config}");
    let services = proxy.services().await.to_string();
    assert!(!services.contains(secret), "/services shows it: {services}");
    let stored = stored.map(|value| value.to_string()).unwrap_or_default();
    assert!(!stored.contains(secret), "KV holds it: {stored}");
    let on_disk = proxy.live_file("haproxy.cfg").await;
    assert!(!on_disk.contains(secret), "haproxy.cfg holds it");
}

#[tokio::test]
async fn users_protect_a_service_and_the_backend_never_sees_the_checked_credentials() {
    let proxy = TestProxy::spawn().await;
    let backend = spawn_auth_echo("shop").await;
    proxy
        .register_instance("shop", "shop-1", backend.port)
        .await;
    let (status, answer) = proxy
        .reconfigure("serviceName=shop&servicePath=/shop&users=alice:wonderland,bob:builder")
        .await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    assert!(!answer.to_string().contains("wonderland"), "{answer}");
    assert_eq!(answer["Users"][0]["Username"], "alice", "{answer}");
    assert_eq!(answer["Users"][0]["PasswordHash"], "***", "{answer}");

    let anonymous = get_as(&proxy, "/shop", None).await;
    assert_eq!(
        anonymous.status,
        StatusCode::UNAUTHORIZED,
        "{}",
        anonymous.body
    );
    assert_eq!(anonymous.challenge.as_deref(), Some("Basic realm=\"shop\""));
    assert!(!anonymous.body.contains("shop authorization"));

    let wrong = get_as(&proxy, "/shop", Some(("alice", "builder"))).await;
    assert_eq!(wrong.status, StatusCode::UNAUTHORIZED);
    let stranger = get_as(&proxy, "/shop", Some(("mallory", "wonderland"))).await;
    assert_eq!(stranger.status, StatusCode::UNAUTHORIZED);

    for (user, password) in [("alice", "wonderland"), ("bob", "builder")] {
        let allowed = get_as(&proxy, "/shop/cart", Some((user, password))).await;
        assert_eq!(allowed.status, StatusCode::OK, "{user}: {}", allowed.body);
        assert_eq!(allowed.body, "shop authorization=none");
    }

    let stored = proxy.stored_spec("shop").await;
    let hash = stored.as_ref().expect("stored spec")["Users"][0]["PasswordHash"]
        .as_str()
        .expect("a stored hash")
        .to_string();
    assert!(hash.starts_with("$6$"), "{hash}");
    assert!(
        !proxy.config().await.contains(&hash),
        "/config masks the hash"
    );
    assert!(proxy.config().await.contains("user alice password ***"));
    for secret in ["wonderland", "builder"] {
        assert_not_shown(&proxy, stored.clone(), secret).await;
    }

    // The same call again keeps the hashes: nothing to reload.
    let on_disk = proxy.live_file("haproxy.cfg").await;
    let before = proxy.snapshot().await;
    proxy
        .reconfigure_ok("serviceName=shop&servicePath=/shop&users=alice:wonderland,bob:builder")
        .await;
    proxy.assert_unchanged_since(&before).await;
    let again = proxy.live_file("haproxy.cfg").await;
    assert_eq!(again, on_disk, "the hashes in haproxy.cfg are the same");
}

#[tokio::test]
async fn users_flag_protects_every_service_and_ignore_authorization_exempts_one_destination() {
    let proxy = TestProxy::spawn_with(|settings| {
        settings.users = Some(Secret::new("ops:opspass"));
    })
    .await;
    let shop = spawn_auth_echo("shop").await;
    let blog = spawn_auth_echo("blog").await;
    proxy.register_instance("shop", "shop-1", shop.port).await;
    proxy.register_instance("blog", "blog-1", blog.port).await;
    proxy
        .reconfigure_ok("serviceName=blog&servicePath=/blog")
        .await;
    proxy
        .reconfigure_ok(
            "serviceName=shop&servicePath.1=/shop&servicePath.2=/shop/health&ignoreAuthorization.2=true&users=alice:wonderland",
        )
        .await;

    // --users guards a service without users of its own.
    let anonymous = get_as(&proxy, "/blog", None).await;
    assert_eq!(anonymous.status, StatusCode::UNAUTHORIZED);
    assert_eq!(anonymous.challenge.as_deref(), Some("Basic realm=\"blog\""));
    let ops = get_as(&proxy, "/blog", Some(("ops", "opspass"))).await;
    assert_eq!(ops.status, StatusCode::OK, "{}", ops.body);
    assert_eq!(ops.body, "blog authorization=none");

    // A service's own users replace --users.
    let ops_on_shop = get_as(&proxy, "/shop", Some(("ops", "opspass"))).await;
    assert_eq!(ops_on_shop.status, StatusCode::UNAUTHORIZED);
    let alice = get_as(&proxy, "/shop", Some(("alice", "wonderland"))).await;
    assert_eq!(alice.status, StatusCode::OK, "{}", alice.body);

    // The exempt destination answers anyone, and its Authorization header is left alone.
    let health = get_as(&proxy, "/shop/health", None).await;
    assert_eq!(health.status, StatusCode::OK, "{}", health.body);
    assert_eq!(health.body, "shop authorization=none");
    let forwarded = get_as(&proxy, "/shop/health", Some(("app", "own-scheme"))).await;
    assert_eq!(forwarded.status, StatusCode::OK);
    assert_eq!(
        forwarded.body, "shop authorization=Basic YXBwOm93bi1zY2hlbWU=",
        "credentials the proxy did not check reach the backend"
    );

    let stored = proxy.stored_spec("shop").await;
    assert_not_shown(&proxy, stored, "opspass").await;
}

#[tokio::test]
async fn encrypted_passwords_are_used_as_given_and_bad_ones_change_nothing() {
    let proxy = TestProxy::spawn().await;
    let backend = spawn_auth_echo("vault").await;
    proxy
        .register_instance("vault", "vault-1", backend.port)
        .await;
    let hash = SECRET_SHA512.replace('$', "%24");
    proxy
        .reconfigure_ok(&format!(
            "serviceName=vault&servicePath=/vault&usersPassEncrypted=true&users=alice:{hash}"
        ))
        .await;
    let allowed = get_as(&proxy, "/vault", Some(("alice", "secret"))).await;
    assert_eq!(allowed.status, StatusCode::OK, "{}", allowed.body);
    assert_eq!(
        get_as(&proxy, "/vault", Some(("alice", "wrong")))
            .await
            .status,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        proxy.stored_spec("vault").await.expect("stored")["Users"][0]["PasswordHash"],
        SECRET_SHA512
    );

    let before = proxy.snapshot().await;
    for (query, parameter) in [
        (
            "serviceName=vault&servicePath=/vault&usersPassEncrypted=true&users=alice:notahash",
            "users",
        ),
        (
            "serviceName=vault&servicePath=/vault&usersPassEncrypted=true&users=alice:%241%24saltsalt%249xy1btjgzLYfb7hivXtC%2F%2F",
            "users",
        ),
        (
            "serviceName=vault&servicePath=/vault&usersPassEncrypted=true&users=alice:%246%24saltsalt%24x%0A%20%20%20%20mode%20tcp",
            "users",
        ),
        ("serviceName=vault&servicePath=/vault&users=al%20ice:pw", "users"),
        ("serviceName=vault&servicePath=/vault&users=alice", "users"),
        (
            "serviceName=vault&servicePath=/vault&ignoreAuthorization=yes",
            "ignoreAuthorization",
        ),
    ] {
        let (status, answer) = proxy.reconfigure(query).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{query}: {answer}");
        let message = answer["Message"].as_str().unwrap_or_default();
        assert!(
            message.contains(&format!("`{parameter}`")),
            "{query}: {message}"
        );
        assert!(!message.contains("notahash") && !message.contains("mode tcp"));
    }
    proxy.assert_unchanged_since(&before).await;
    let still = get_as(&proxy, "/vault", Some(("alice", "secret"))).await;
    assert_eq!(still.status, StatusCode::OK);
}

#[tokio::test]
async fn no_password_reaches_the_log_kv_or_answers_of_a_flow_proxy_process() {
    let registry = SharedRegistry::start().await;
    let backend = spawn_auth_echo("shop").await;
    registry
        .register_instance("shop", "shop-1", backend.port)
        .await;
    let mut proxy = ProxyProcess::start_with(
        &registry.address(),
        ProxyOptions {
            env: vec![
                ("USERS".into(), "ops:opsSecret1".into()),
                ("STATS_USER".into(), "admin".into()),
                ("STATS_PASS".into(), "statsSecret2".into()),
                ("RUST_LOG".into(), "debug".into()),
            ],
            ..ProxyOptions::default()
        },
    )
    .await;
    proxy
        .reconfigure_ok("serviceName=shop&servicePath=/shop&users=alice:aliceSecret3")
        .await;
    // A refused call logs too: its error must not repeat the password either.
    let (status, _) = proxy
        .reconfigure("serviceName=shop&servicePath=/shop&users=alice:aliceSecret4,alice:x")
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);

    let alice = get_as(&proxy, "/shop", Some(("alice", "aliceSecret3"))).await;
    assert_eq!(alice.status, StatusCode::OK, "{}", alice.body);
    let stats = proxy
        .http()
        .get(format!("http://127.0.0.1:{}/admin?stats", proxy.http_port))
        .basic_auth("admin", Some("statsSecret2"))
        .send()
        .await
        .expect("stats page answers");
    assert_eq!(stats.status(), StatusCode::OK);

    let stored = registry.stored_spec("shop").await;
    // The debug log has seen the reconfigure call by now.
    eventually(
        "the log shows the reconfigure",
        Duration::from_secs(5),
        || {
            let log = proxy.log();
            async move { log.contains("reconfigure") }
        },
    )
    .await;
    for secret in ["opsSecret1", "statsSecret2", "aliceSecret3", "aliceSecret4"] {
        assert_not_shown(&proxy, stored.clone(), secret).await;
        let log = proxy.log();
        assert!(!log.contains(secret), "the log shows {secret}:\n{log}");
    }
    proxy.stop().await;
}

#[tokio::test]
async fn basic_auth_applies_over_https_too() {
    let proxy = TestProxy::spawn().await;
    let backend = spawn_auth_echo("shop").await;
    proxy
        .register_instance("shop", "shop-1", backend.port)
        .await;
    proxy
        .reconfigure_ok("serviceName=shop&servicePath=/shop&users=alice:wonderland")
        .await;
    let ca = TestCa::new();
    let (status, answer) = put_cert(&proxy, "shop", &ca.bundle(&["shop.example.com"])).await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    let https_port = proxy.settings().https_port;

    let refused = https_request(
        https_port,
        &ca.root,
        "GET",
        "/shop",
        "shop.example.com",
        &[],
    )
    .await;
    assert_eq!(refused.status, 401);
    assert_eq!(
        refused.header("www-authenticate"),
        Some("Basic realm=\"shop\"")
    );
    // alice:wonderland
    let alice = https_request(
        https_port,
        &ca.root,
        "GET",
        "/shop",
        "shop.example.com",
        &[("Authorization", "Basic YWxpY2U6d29uZGVybGFuZA==")],
    )
    .await;
    assert_eq!(alice.status, 200, "{}", alice.body);
    assert_eq!(alice.body, "shop authorization=none");
}
