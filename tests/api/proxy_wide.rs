//! Proxy-wide settings, told as the operator's stories: timeouts, `maxconn`, the connection
//! mode, extra lines, header captures and the request log from flags (Docker Flow Proxy's
//! environment variables), and `maxconn` and the timeouts kept in Consul KV under
//! `<kv-prefix>/settings/`, followed by every proxy sharing the Consul.

use std::net::Ipv4Addr;
use std::process::Stdio;
use std::time::Duration;

use flow_proxy::spec::{ConnectionMode, HaproxyTime};
use reqwest::StatusCode;
use serde_json::Value;
use tokio::time::Instant;

use crate::fleet::{eventually, ProxyOptions, ProxyProcess, SharedRegistry, KV_PREFIX};
use crate::helpers::{free_port, proxy_routing_demo_with, spawn_backend, TestProxy};
use crate::proxy_client::ProxyClient;

/// How long the slow backend takes to answer.
const SLOW_ANSWER: Duration = Duration::from_millis(1500);

/// A backend on 127.0.0.1 that answers `slow <path>` after [`SLOW_ANSWER`].
struct SlowBackend {
    port: u16,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for SlowBackend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn spawn_slow_backend() -> SlowBackend {
    let listener = tokio::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .await
        .expect("bind the slow backend");
    let port = listener.local_addr().expect("backend address").port();
    let app = axum::Router::new().fallback(|uri: axum::http::Uri| async move {
        tokio::time::sleep(SLOW_ANSWER).await;
        format!("slow {}", uri.path())
    });
    let task = tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    SlowBackend { port, task }
}

/// `GET <path>` through the proxy; the status and how long it took.
async fn timed_get(proxy: &ProxyClient, path: &str) -> (StatusCode, Duration) {
    let started = Instant::now();
    let (status, _) = proxy.get_through_proxy(path, None).await;
    (status, started.elapsed())
}

/// HAProxy's `Maxconn` as its Runtime API (`show info`) reports it.
async fn haproxy_maxconn(proxy: &ProxyClient) -> Option<u32> {
    let socket = proxy
        .data_dir()
        .canonicalize()
        .expect("the data directory exists")
        .join("haproxy.sock");
    let info = flow_proxy::haproxy::runtime_command(&socket, "show info")
        .await
        .ok()?;
    info.lines()
        .find_map(|line| line.strip_prefix("Maxconn:"))
        .and_then(|value| value.trim().parse().ok())
}

/// The setting named `name` as `/settings` shows it: (value, source).
async fn shown_setting(proxy: &ProxyClient, name: &str) -> (Value, String) {
    let (status, body) = proxy.api_get("/v1/docker-flow-proxy/settings").await;
    assert_eq!(status, StatusCode::OK, "GET /settings: {body}");
    let setting = body["settings"]
        .as_array()
        .expect("a list of settings")
        .iter()
        .find(|setting| setting["name"] == name)
        .unwrap_or_else(|| panic!("/settings shows {name}: {body}"))
        .clone();
    (
        setting["value"].clone(),
        setting["source"].as_str().unwrap_or_default().to_string(),
    )
}

/// Deletes a KV key of the registry `proxy` uses (in-process proxies).
async fn delete_kv(proxy: &TestProxy, key: &str) {
    let response = proxy
        .http()
        .delete(format!("http://{}/v1/kv/{key}", proxy.registry_address()))
        .send()
        .await
        .expect("registry answers");
    assert_eq!(response.status(), StatusCode::OK, "DELETE {key}");
}

#[tokio::test]
async fn timeout_server_flag_answers_504_for_an_instance_slower_than_it() {
    let proxy = TestProxy::spawn_with(|settings| {
        settings.proxy_wide.timeout_server = Some(HaproxyTime::parse("300ms").expect("a time"));
    })
    .await;
    let slow = spawn_slow_backend().await;
    proxy.register_instance("slow", "slow.1", slow.port).await;
    proxy
        .reconfigure_ok("serviceName=slow&servicePath=/slow")
        .await;

    let (status, took) = timed_get(&proxy, "/slow/report").await;
    assert_eq!(status, StatusCode::GATEWAY_TIMEOUT, "took {took:?}");
    assert!(
        took < SLOW_ANSWER,
        "HAProxy gave up after 300ms, took {took:?}"
    );
    let (value, source) = shown_setting(&proxy, "timeout server").await;
    assert_eq!((value.as_str(), source.as_str()), (Some("300ms"), "flag"));
}

#[tokio::test]
async fn without_the_flag_a_slow_instance_still_answers() {
    let proxy = TestProxy::spawn().await;
    let slow = spawn_slow_backend().await;
    proxy.register_instance("slow", "slow.1", slow.port).await;
    proxy
        .reconfigure_ok("serviceName=slow&servicePath=/slow")
        .await;

    let (status, body) = proxy.get_through_proxy("/slow/report", None).await;
    assert_eq!(
        (status, body.as_str()),
        (StatusCode::OK, "slow /slow/report")
    );
    let (value, source) = shown_setting(&proxy, "timeout server").await;
    assert_eq!((value.as_str(), source.as_str()), (Some("60s"), "default"));
}

/// Whether HAProxy runs with `maxconn` and `/settings` shows it coming from `source`.
async fn runs_maxconn(proxy: &ProxyClient, maxconn: u32, source: &str) -> bool {
    haproxy_maxconn(proxy).await == Some(maxconn)
        && shown_setting(proxy, "maxconn").await
            == (Value::from(maxconn.to_string()), source.to_string())
}

#[tokio::test]
async fn maxconn_comes_from_the_flag_then_from_consul_kv_and_back_when_the_key_goes() {
    let proxy = TestProxy::spawn_with(|settings| settings.proxy_wide.maxconn = Some(321)).await;
    assert!(runs_maxconn(&proxy, 321, "flag").await);

    proxy.put_kv("flow-proxy/settings/maxconn", "123").await;
    eventually(
        "HAProxy runs with maxconn 123 from KV",
        Duration::from_secs(5),
        || runs_maxconn(&proxy, 123, "consul-kv"),
    )
    .await;

    delete_kv(&proxy, "flow-proxy/settings/maxconn").await;
    eventually(
        "HAProxy is back to the flag's maxconn",
        Duration::from_secs(5),
        || runs_maxconn(&proxy, 321, "flag"),
    )
    .await;
}

#[tokio::test]
async fn maxconn_in_kv_is_read_at_start() {
    let mut proxy = TestProxy::spawn().await;
    assert_eq!(haproxy_maxconn(&proxy).await, Some(4096));
    proxy.put_kv("flow-proxy/settings/maxconn", "777").await;
    eventually("maxconn 777 applies", Duration::from_secs(5), || async {
        haproxy_maxconn(&proxy).await == Some(777)
    })
    .await;
    proxy.stop().await;
    proxy.start_again().await;
    // The restart restores before it answers: no waiting here.
    assert_eq!(haproxy_maxconn(&proxy).await, Some(777));
}

#[tokio::test]
async fn connection_mode_flag_closes_the_client_connection_after_each_response() {
    let (proxy, _backend) = proxy_routing_demo_with(|settings| {
        settings.proxy_wide.connection_mode = Some(ConnectionMode::HttpClose);
    })
    .await;
    let response = proxy
        .http()
        .get(format!(
            "http://127.0.0.1:{}/demo/x",
            proxy.settings().http_port
        ))
        .send()
        .await
        .expect("HAProxy answers");
    assert_eq!(response.status(), StatusCode::OK);
    let connection = response
        .headers()
        .get("connection")
        .and_then(|value| value.to_str().ok())
        .unwrap_or_default()
        .to_string();
    assert_eq!(connection, "close", "httpclose tells the client");
}

#[tokio::test]
async fn extra_frontend_lines_apply_to_every_request() {
    let (proxy, _backend) = proxy_routing_demo_with(|settings| {
        settings.proxy_wide.extra_frontend = vec![
            "http-response set-header X-Served-By flow-proxy"
                .parse()
                .expect("a line"),
            "http-request set-header X-Extra yes"
                .parse()
                .expect("a line"),
        ];
    })
    .await;
    let response = proxy
        .http()
        .get(format!(
            "http://127.0.0.1:{}/demo/x",
            proxy.settings().http_port
        ))
        .send()
        .await
        .expect("HAProxy answers");
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(
        response
            .headers()
            .get("x-served-by")
            .and_then(|value| value.to_str().ok()),
        Some("flow-proxy")
    );
}

/// Runs the flow-proxy binary with `args` (and its own empty data directory, free ports,
/// loopback only) and expects it to exit by itself within 20 s; its exit success and its output.
async fn run_expecting_exit(args: &[&str]) -> (bool, String) {
    let data_dir = tempfile::tempdir().expect("data directory");
    let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_flow-proxy"));
    command
        .args(["--api-address", &format!("127.0.0.1:{}", free_port())])
        .args(["--embedded-registry-address", "127.0.0.1:0"])
        .args(["--bind-host", "127.0.0.1"])
        .args(["--http-port", &free_port().to_string()])
        .args(["--https-port", &free_port().to_string()])
        .arg("--data-dir")
        .arg(data_dir.path())
        .arg("--stop-haproxy-on-exit")
        .args(args)
        // Nothing from the environment the tests run in, but where to find haproxy.
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let output = tokio::time::timeout(Duration::from_secs(20), command.output())
        .await
        .expect("flow-proxy exits by itself")
        .expect("flow-proxy runs");
    let mut text = String::from_utf8_lossy(&output.stdout).into_owned();
    text.push_str(&String::from_utf8_lossy(&output.stderr));
    (output.status.success(), text)
}

#[tokio::test]
async fn a_bad_extra_global_line_stops_flow_proxy_with_haproxys_message() {
    let (succeeded, output) =
        run_expecting_exit(&["--extra-global", "tune.bufsize 32768,no-such-keyword 1"]).await;
    assert!(!succeeded, "flow-proxy must not start: {output}");
    assert!(
        output.contains("--extra-global") && output.contains("no-such-keyword"),
        "the error names the flag and HAProxy's complaint: {output}"
    );
    assert!(
        output.contains("[ALERT]"),
        "HAProxy's own message: {output}"
    );
}

#[tokio::test]
async fn a_bad_extra_frontend_line_stops_flow_proxy_with_haproxys_message() {
    let (succeeded, output) =
        run_expecting_exit(&["--extra-frontend", "http-request frobnicate"]).await;
    assert!(!succeeded, "flow-proxy must not start: {output}");
    assert!(
        output.contains("--extra-frontend") && output.contains("frobnicate"),
        "{output}"
    );
}

#[tokio::test]
async fn bad_flag_values_are_refused_at_start_naming_the_flag() {
    for (args, named) in [
        (["--timeout-server", "soon"], "--timeout-server"),
        (["--timeout-connect", "25d"], "--timeout-connect"),
        (["--maxconn", "0"], "--maxconn"),
        (["--connection-mode", "forceclose"], "--connection-mode"),
        (
            ["--capture-request-header", "Host"],
            "--capture-request-header",
        ),
        (["--extra-global", "backend smuggled"], "--extra-global"),
    ] {
        let (succeeded, output) = run_expecting_exit(&args).await;
        assert!(!succeeded, "{args:?} must not start: {output}");
        assert!(output.contains(named), "{args:?}: {output}");
    }
}

/// A fleet of two proxies on one registry, both routing `/slow` to the slow backend.
async fn two_proxies_routing_slow(
    registry: &SharedRegistry,
    slow: &SlowBackend,
    options: ProxyOptions,
) -> (ProxyProcess, ProxyProcess) {
    registry
        .register_instance("slow", "slow.1", slow.port)
        .await;
    let first = ProxyProcess::start_with(&registry.address(), options.clone()).await;
    let second = ProxyProcess::start_with(&registry.address(), options).await;
    first
        .reconfigure_ok("serviceName=slow&servicePath=/slow")
        .await;
    eventually(
        "the second proxy routes /slow",
        Duration::from_secs(5),
        || async { second.get_through_proxy("/slow/", None).await.0 == StatusCode::OK },
    )
    .await;
    (first, second)
}

#[tokio::test]
async fn a_timeout_set_in_consul_kv_reaches_every_proxy_within_a_second() {
    let registry = SharedRegistry::start().await;
    let slow = spawn_slow_backend().await;
    let (first, second) = two_proxies_routing_slow(&registry, &slow, ProxyOptions::default()).await;

    registry
        .put_kv(&format!("{KV_PREFIX}/settings/timeouts/server"), "200ms")
        .await;
    let took = eventually(
        "both proxies run timeout server 200ms from KV",
        Duration::from_secs(1),
        || async {
            for proxy in [&first, &second] {
                let (value, source) = shown_setting(proxy, "timeout server").await;
                if (value.as_str(), source.as_str()) != (Some("200ms"), "consul-kv") {
                    return false;
                }
            }
            true
        },
    )
    .await;
    eprintln!("a KV timeout reached both proxies in {took:?}");
    for proxy in [&first, &second] {
        let (status, took) = timed_get(proxy, "/slow/report").await;
        assert_eq!(status, StatusCode::GATEWAY_TIMEOUT, "took {took:?}");
    }

    // Removing the key gives the timeout back to the flag (here the default, 60s).
    let key = format!("{KV_PREFIX}/settings/timeouts/server");
    let deleted = reqwest::Client::new()
        .delete(format!("{}/v1/kv/{key}", registry.url()))
        .send()
        .await
        .expect("registry answers");
    assert_eq!(deleted.status(), StatusCode::OK, "DELETE {key}");
    for proxy in [&first, &second] {
        eventually(
            "the default timeout is back",
            Duration::from_secs(2),
            || async {
                shown_setting(proxy, "timeout server").await
                    == (Value::from("60s"), "default".to_string())
            },
        )
        .await;
        assert_eq!(
            proxy.get_through_proxy("/slow/report", None).await,
            (StatusCode::OK, "slow /slow/report".to_string())
        );
    }
}

#[tokio::test]
async fn a_bad_value_in_consul_kv_is_logged_and_ignored_and_never_blocks_other_changes() {
    let registry = SharedRegistry::start().await;
    let slow = spawn_slow_backend().await;
    let options = ProxyOptions {
        extra_args: vec!["--timeout-server".into(), "5".into()],
        ..ProxyOptions::default()
    };
    let (first, second) = two_proxies_routing_slow(&registry, &slow, options).await;

    registry
        .put_kv(&format!("{KV_PREFIX}/settings/timeouts/server"), "500")
        .await;
    registry
        .put_kv(&format!("{KV_PREFIX}/settings/maxconn"), "lots\nglobal")
        .await;
    registry
        .put_kv(&format!("{KV_PREFIX}/settings/timeouts/connect"), "3s")
        .await;
    for proxy in [&first, &second] {
        eventually("the good key applies", Duration::from_secs(2), || async {
            shown_setting(proxy, "timeout connect").await
                == (Value::from("3s"), "consul-kv".to_string())
        })
        .await;
        let log = proxy.log();
        for key in ["settings/timeouts/server", "settings/maxconn"] {
            assert!(
                log.lines().any(
                    |line| line.contains("ignoring a proxy-wide setting") && line.contains(key)
                ),
                "the bad {key} is logged: {log}"
            );
        }
        assert_eq!(
            shown_setting(proxy, "timeout server").await,
            (Value::from("5s"), "flag".to_string()),
            "the flag applies where KV is bad"
        );
        assert_eq!(
            shown_setting(proxy, "maxconn").await,
            (Value::from("4096"), "default".to_string())
        );
        assert!(
            !proxy.config().await.contains("lots"),
            "the bad value never reaches haproxy.cfg"
        );
        assert_eq!(
            proxy.get_through_proxy("/slow/report", None).await,
            (StatusCode::OK, "slow /slow/report".to_string()),
            "the proxy keeps serving"
        );
    }

    // Routing changes still go through, on both proxies.
    let backend = spawn_backend("demo").await;
    registry
        .register_instance("demo", "demo.1", backend.port)
        .await;
    second
        .reconfigure_ok("serviceName=demo&servicePath=/demo")
        .await;
    eventually(
        "the first proxy routes /demo",
        Duration::from_secs(5),
        || async {
            first.get_through_proxy("/demo/x", None).await
                == (StatusCode::OK, "demo /demo/x".into())
        },
    )
    .await;
}

#[tokio::test]
async fn access_log_shows_every_request_on_stdout_with_the_captured_headers() {
    let registry = SharedRegistry::start().await;
    let backend = spawn_backend("demo").await;
    registry
        .register_instance("demo", "demo.1", backend.port)
        .await;
    let proxy = ProxyProcess::start_with(
        &registry.address(),
        ProxyOptions {
            // Docker Flow Proxy's variable turns the log on.
            env: vec![("DEBUG".into(), "true".into())],
            extra_args: vec![
                "--capture-request-header".into(),
                "X-Request-Id:20,Host:40".into(),
            ],
            ..ProxyOptions::default()
        },
    )
    .await;
    proxy
        .reconfigure_ok("serviceName=demo&servicePath=/demo")
        .await;
    let response = proxy
        .http()
        .get(format!("http://127.0.0.1:{}/demo/logged", proxy.http_port))
        .header("X-Request-Id", "req-4711")
        .send()
        .await
        .expect("HAProxy answers");
    assert_eq!(response.status(), StatusCode::OK);

    let line = |log: String| {
        log.lines()
            .find(|line| line.contains("\"GET /demo/logged HTTP/1.1\""))
            .map(str::to_string)
    };
    eventually(
        "the request's log line is on stdout",
        Duration::from_secs(5),
        || async { line(proxy.log()).is_some() },
    )
    .await;
    let logged = line(proxy.log()).expect("the line");
    assert!(logged.contains(" 200 "), "status in the line: {logged}");
    assert!(
        logged.contains("demo-be0/"),
        "backend in the line: {logged}"
    );
    assert!(
        logged.contains(&format!("{{req-4711|127.0.0.1:{}}}", proxy.http_port)),
        "captured headers in the line: {logged}"
    );
}

#[tokio::test]
async fn a_maxconn_haproxy_cannot_start_with_is_logged_and_the_serving_process_stays() {
    let registry = SharedRegistry::start().await;
    let backend = spawn_backend("demo").await;
    registry
        .register_instance("demo", "demo.1", backend.port)
        .await;
    let proxy = ProxyProcess::start(&registry.address(), &[]).await;
    proxy
        .reconfigure_ok("serviceName=demo&servicePath=/demo")
        .await;
    let serving = proxy.haproxy_pid().await;

    // Valid as a number, but HAProxy needs two open files per connection: it cannot start.
    registry
        .put_kv(&format!("{KV_PREFIX}/settings/maxconn"), "10000000")
        .await;
    eventually("the refusal is logged", Duration::from_secs(10), || async {
        proxy
            .log()
            .contains("ignoring proxy-wide settings in Consul KV that HAProxy does not accept")
    })
    .await;
    assert_eq!(
        proxy.haproxy_pid().await,
        serving,
        "the serving HAProxy stays"
    );
    assert_eq!(haproxy_maxconn(&proxy).await, Some(4096));
    assert_eq!(
        proxy.get_through_proxy("/demo/x", None).await,
        (StatusCode::OK, "demo /demo/x".to_string())
    );
    assert_eq!(
        shown_setting(&proxy, "maxconn").await,
        (Value::from("4096"), "default".to_string())
    );

    // Routing changes still apply, and a maxconn HAProxy can run with replaces the refused one.
    proxy
        .reconfigure_ok("serviceName=other&servicePath=/other")
        .await;
    registry
        .put_kv(&format!("{KV_PREFIX}/settings/maxconn"), "900")
        .await;
    eventually("maxconn 900 applies", Duration::from_secs(5), || {
        runs_maxconn(&proxy, 900, "consul-kv")
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hard_stop_after_ends_the_connections_an_old_process_keeps_after_a_reload() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let proxy = TestProxy::spawn_with(|settings| {
        settings.proxy_wide.hard_stop_after = Some(HaproxyTime::parse("1s").expect("a time"));
    })
    .await;
    // An instance that echoes every byte, for as long as the client stays.
    let echo = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind the echo instance");
    let echo_port = echo.local_addr().expect("address").port();
    let echo_task = tokio::spawn(async move {
        while let Ok((mut stream, _)) = echo.accept().await {
            tokio::spawn(async move {
                let mut buffer = [0u8; 64];
                while let Ok(read) = stream.read(&mut buffer).await {
                    if read == 0 || stream.write_all(&buffer[..read]).await.is_err() {
                        break;
                    }
                }
            });
        }
    });
    proxy.register_instance("db", "db-1", echo_port).await;
    let src_port = free_port();
    proxy
        .reconfigure_ok(&format!("serviceName=db&reqMode=tcp&srcPort={src_port}"))
        .await;
    let mut client = tokio::net::TcpStream::connect(("127.0.0.1", src_port))
        .await
        .expect("the tcp frontend accepts");
    client.write_all(b"ping").await.expect("send");
    let mut answer = [0u8; 4];
    client.read_exact(&mut answer).await.expect("echoed");
    assert_eq!(&answer, b"ping");

    // A change that needs a reload: the process holding the connection becomes the old one.
    proxy
        .reconfigure_ok("serviceName=other&servicePath=/other")
        .await;
    let reloaded = std::time::Instant::now();
    let mut rest = [0u8; 4];
    let read = tokio::time::timeout(Duration::from_secs(10), client.read(&mut rest))
        .await
        .expect("the old process ends the connection within --hard-stop-after (1s), not 30s");
    assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
    assert!(
        reloaded.elapsed() < Duration::from_secs(6),
        "closed after {:?}",
        reloaded.elapsed()
    );
    assert!(proxy.config().await.contains("hard-stop-after 1s"));
    echo_task.abort();
}
