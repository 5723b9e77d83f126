//! Backend tuning and the load-balancing workflows teams bring from Nginx/HAProxy consul-template
//! setups and from Docker Flow Proxy: least connections with passive health, sticky clients
//! (by source address and by cookie, behind HTTPS with HSTS), an HTTP health check on a path of
//! the user's choice, scaling that follows Consul, and timeouts, connection mode and compression
//! that change what a client sees.
//!
//! The instances here are tiny HTTP servers whose behaviour a test changes while they run
//! (answer, answer 500, hang up, answer slowly, fail `/health`, stop listening); every request
//! goes through the real HAProxy.

use std::net::Ipv4Addr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use reqwest::StatusCode;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::fleet::eventually;
use crate::helpers::{free_port, proxy_routing_demo, TestProxy};
use crate::tls::{http_request, https_request, put_cert, RawAnswer, TestCa};

/// How an [`Instance`] answers a request (other than `/health`) right now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Behaviour {
    /// 200 with `<name> <path>`.
    Answer,
    /// 500 with `<name> failing`.
    Fail,
    /// Closes the connection without answering.
    HangUp,
    /// Answers 200 after this long.
    Slow(Duration),
}

/// A test instance on 127.0.0.1: one request per connection (`Connection: close`), `/health`
/// answers 200 or 503 as [`Instance::set_healthy`] says, `/big` is 8 KiB of text.
struct Instance {
    name: String,
    port: u16,
    behaviour: Arc<Mutex<Behaviour>>,
    healthy: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Instance {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Instance {
    async fn spawn(name: &str) -> Instance {
        let listener = tokio::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .await
            .expect("bind instance");
        let port = listener.local_addr().expect("instance address").port();
        let behaviour = Arc::new(Mutex::new(Behaviour::Answer));
        let healthy = Arc::new(AtomicBool::new(true));
        let task = {
            let (name, behaviour, healthy) = (name.to_string(), behaviour.clone(), healthy.clone());
            tokio::spawn(async move {
                while let Ok((stream, _)) = listener.accept().await {
                    let now = *behaviour.lock().expect("behaviour");
                    let healthy = healthy.load(Ordering::SeqCst);
                    tokio::spawn(serve_one(stream, name.clone(), now, healthy));
                }
            })
        };
        Instance {
            name: name.to_string(),
            port,
            behaviour,
            healthy,
            task,
        }
    }

    fn behave(&self, behaviour: Behaviour) {
        *self.behaviour.lock().expect("behaviour") = behaviour;
    }

    fn set_healthy(&self, healthy: bool) {
        self.healthy.store(healthy, Ordering::SeqCst);
    }

    /// Stops listening: new connections are refused, as when the container stops.
    fn stop(&self) {
        self.task.abort();
    }
}

/// Reads one request off `stream` and answers it as `behaviour` says.
async fn serve_one(
    mut stream: tokio::net::TcpStream,
    name: String,
    behaviour: Behaviour,
    healthy: bool,
) {
    let mut request = Vec::new();
    let mut buffer = [0u8; 4096];
    let read = tokio::time::timeout(Duration::from_secs(10), async {
        while !request.windows(4).any(|w| w == b"\r\n\r\n") && request.len() < 65_536 {
            match stream.read(&mut buffer).await {
                Ok(0) | Err(_) => return false,
                Ok(n) => request.extend_from_slice(&buffer[..n]),
            }
        }
        true
    })
    .await;
    if read != Ok(true) {
        return;
    }
    let head = String::from_utf8_lossy(&request);
    let path = head.split(' ').nth(1).unwrap_or("/").to_string();
    let (status, body) = if path == "/health" {
        if healthy {
            ("200 OK", format!("{name} healthy"))
        } else {
            ("503 Service Unavailable", format!("{name} unhealthy"))
        }
    } else {
        match behaviour {
            Behaviour::HangUp => return,
            Behaviour::Fail => ("500 Internal Server Error", format!("{name} failing")),
            Behaviour::Slow(delay) => {
                tokio::time::sleep(delay).await;
                ("200 OK", format!("{name} {path}"))
            }
            Behaviour::Answer if path == "/big" => (
                "200 OK",
                format!("{name} {}", "flow-proxy compresses text. ".repeat(300)),
            ),
            Behaviour::Answer => ("200 OK", format!("{name} {path}")),
        }
    };
    let answer = format!(
        "HTTP/1.1 {status}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = stream.write_all(answer.as_bytes()).await;
    let _ = stream.shutdown().await;
}

/// `GET path` through the proxy's HTTP frontend on a connection of its own.
async fn ask(proxy: &TestProxy, path: &str, headers: &[(&str, &str)]) -> RawAnswer {
    http_request(
        proxy.settings().http_port,
        "GET",
        path,
        "localhost",
        headers,
    )
    .await
}

/// The instance that answered (the first word of the body).
fn answered_by(answer: &RawAnswer) -> &str {
    answer.body.split(' ').next().unwrap_or_default()
}

/// Asks `path` `count` times; `(status, instance)` of each answer.
async fn answers(proxy: &TestProxy, path: &str, count: usize) -> Vec<(u16, String)> {
    let mut seen = Vec::with_capacity(count);
    for _ in 0..count {
        let answer = ask(proxy, path, &[]).await;
        seen.push((answer.status, answered_by(&answer).to_string()));
    }
    seen
}

/// Whether `count` requests in a row were all answered 200 by `name`.
async fn only(proxy: &TestProxy, path: &str, name: &str, count: usize) -> bool {
    answers(proxy, path, count)
        .await
        .iter()
        .all(|(status, who)| *status == 200 && who == name)
}

/// Whether every one of `names` answered 200 within `count` requests.
async fn all_answer(proxy: &TestProxy, path: &str, names: &[&str], count: usize) -> bool {
    let seen = answers(proxy, path, count).await;
    names.iter().all(|name| {
        seen.iter()
            .any(|(status, who)| *status == 200 && who == name)
    })
}

/// The IDs of the passing instances of `service` in the registry (what Consul says).
async fn passing_in_registry(proxy: &TestProxy, service: &str) -> usize {
    let entries = proxy
        .registry_json(&format!("/v1/health/service/{service}?passing"))
        .await;
    entries.as_array().map_or(0, Vec::len)
}

async fn register(proxy: &TestProxy, service: &str, instances: &[&Instance]) {
    for instance in instances {
        proxy
            .register_instance(
                service,
                &format!("{service}.{}", instance.name),
                instance.port,
            )
            .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn least_connections_with_passive_health_takes_a_failing_instance_out_between_consul_checks()
{
    // Nginx: `upstream shop { least_conn; server a max_fails=3 fail_timeout=5s; server b …; }`.
    let proxy = TestProxy::spawn().await;
    let a = Instance::spawn("a").await;
    let b = Instance::spawn("b").await;
    register(&proxy, "shop", &[&a, &b]).await;
    proxy
        .reconfigure_ok(
            "serviceName=shop&servicePath=/shop&balance=leastconn&observe=layer7&maxFails=3",
        )
        .await;
    eventually("both instances answer", Duration::from_secs(10), || {
        all_answer(&proxy, "/shop", &["a", "b"], 10)
    })
    .await;

    // Instance a starts answering 500: after three failures HAProxy takes it out by itself.
    a.behave(Behaviour::Fail);
    let mut failures = 0;
    let mut in_a_row_from_b = 0;
    for _ in 0..40 {
        let answer = ask(&proxy, "/shop", &[]).await;
        if answer.status == 500 {
            failures += 1;
            in_a_row_from_b = 0;
        } else {
            assert_eq!(answer.status, 200, "{answer:?}");
            assert_eq!(answered_by(&answer), "b");
            in_a_row_from_b += 1;
            if in_a_row_from_b == 15 {
                break;
            }
        }
    }
    assert_eq!(in_a_row_from_b, 15, "b alone answers once a is out");
    assert!(
        failures <= 3,
        "clients saw {failures} failures (maxFails=3)"
    );
    println!("observe=layer7 maxFails=3: clients saw {failures} failures before a was out");
    assert_eq!(
        passing_in_registry(&proxy, "shop").await,
        2,
        "Consul still says both are passing: HAProxy acted on its own"
    );

    // Healed, a comes back through the active checks; a connection that is hung up on is a
    // failure too.
    a.behave(Behaviour::Answer);
    eventually("a is back in rotation", Duration::from_secs(15), || {
        all_answer(&proxy, "/shop", &["a", "b"], 10)
    })
    .await;
    a.behave(Behaviour::HangUp);
    eventually("a hanging up is taken out", Duration::from_secs(10), || {
        only(&proxy, "/shop", "b", 10)
    })
    .await;

    // A stopped instance leaves rotation: clients are answered by the other one.
    a.behave(Behaviour::Answer);
    eventually("a is back again", Duration::from_secs(15), || {
        all_answer(&proxy, "/shop", &["a", "b"], 10)
    })
    .await;
    b.stop();
    eventually(
        "only a answers once b stopped",
        Duration::from_secs(10),
        || only(&proxy, "/shop", "a", 10),
    )
    .await;

    // No instance left: a clean 503 page.
    a.stop();
    eventually(
        "no instance: a clean 503",
        Duration::from_secs(15),
        || async {
            let answer = ask(&proxy, "/shop", &[]).await;
            answer.status == 503 && answer.body.contains("No service is available")
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn balance_source_keeps_one_client_on_one_instance() {
    // Nginx: `ip_hash;`.
    let proxy = TestProxy::spawn().await;
    let instances = [
        Instance::spawn("a").await,
        Instance::spawn("b").await,
        Instance::spawn("c").await,
    ];
    register(&proxy, "pin", &instances.iter().collect::<Vec<_>>()).await;
    proxy
        .reconfigure_ok("serviceName=pin&servicePath=/pin")
        .await;
    let spread = proxy.names_answering("/pin", None, 9).await;
    let mut distinct = spread.clone();
    distinct.sort();
    distinct.dedup();
    assert_eq!(distinct.len(), 3, "round robin spreads: {spread:?}");

    proxy
        .reconfigure_ok("serviceName=pin&servicePath=/pin&balance=source")
        .await;
    let pinned = proxy.names_answering("/pin", None, 20).await;
    assert!(
        pinned.iter().all(|name| *name == pinned[0]),
        "one client, one instance: {pinned:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sticky_server_cookie_behind_https_with_hsts_is_the_whole_iiiepe_setup() {
    // IIIEPE: HTTP redirected to HTTPS, HSTS, sessions pinned to an instance.
    let proxy = TestProxy::spawn().await;
    let instances = [
        Instance::spawn("a").await,
        Instance::spawn("b").await,
        Instance::spawn("c").await,
    ];
    register(&proxy, "shop", &instances.iter().collect::<Vec<_>>()).await;
    let ca = TestCa::new();
    let (status, answer) = put_cert(&proxy, "shop", &ca.bundle(&["shop.example.test"])).await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    proxy
        .reconfigure_ok(
            "serviceName=shop&serviceDomain=shop.example.test&httpsOnly=true\
             &sessionType=sticky-server\
             &setResHeader=Strict-Transport-Security%20max-age=31536000",
        )
        .await;
    let https_port = proxy.settings().https_port;
    let host = "shop.example.test";

    let plain = http_request(proxy.settings().http_port, "GET", "/cart", host, &[]).await;
    assert_eq!(plain.status, 302, "{plain:?}");
    assert_eq!(
        plain.header("location"),
        Some("https://shop.example.test/cart")
    );

    let first = https_request(https_port, &ca.root, "GET", "/cart", host, &[]).await;
    assert_eq!(first.status, 200, "{first:?}");
    assert_eq!(
        first.header("strict-transport-security"),
        Some("max-age=31536000")
    );
    let cookie = first
        .header("set-cookie")
        .and_then(|value| value.split(';').next())
        .unwrap_or_else(|| panic!("a stickiness cookie: {first:?}"))
        .to_string();
    assert!(cookie.starts_with("shop="), "{cookie}");
    let mine = answered_by(&first).to_string();
    for _ in 0..10 {
        let again = https_request(
            https_port,
            &ca.root,
            "GET",
            "/cart",
            host,
            &[("Cookie", &cookie)],
        )
        .await;
        assert_eq!(again.status, 200, "{again:?}");
        assert_eq!(
            answered_by(&again),
            mine,
            "the cookie keeps the client on {mine}"
        );
    }
    let mut others = Vec::new();
    for _ in 0..9 {
        let fresh = https_request(https_port, &ca.root, "GET", "/cart", host, &[]).await;
        assert_eq!(fresh.status, 200, "{fresh:?}");
        others.push(answered_by(&fresh).to_string());
    }
    others.sort();
    others.dedup();
    assert!(
        others.len() >= 2,
        "clients without the cookie are spread: {others:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_path_takes_an_instance_out_while_its_health_fails_and_back_when_it_passes() {
    let proxy = TestProxy::spawn().await;
    let a = Instance::spawn("a").await;
    let b = Instance::spawn("b").await;
    register(&proxy, "web", &[&a, &b]).await;
    proxy
        .reconfigure_ok("serviceName=web&servicePath=/web&checkPath=/health&checkInterval=300ms")
        .await;
    eventually("both instances answer", Duration::from_secs(10), || {
        all_answer(&proxy, "/web", &["a", "b"], 10)
    })
    .await;

    // a still serves /web, but its /health fails: HAProxy's check takes it out.
    a.set_healthy(false);
    let out = eventually("a leaves rotation", Duration::from_secs(10), || {
        only(&proxy, "/web", "b", 10)
    })
    .await;
    println!("checkInterval=300ms: a out of rotation after {out:?}");
    assert_eq!(passing_in_registry(&proxy, "web").await, 2);

    a.set_healthy(true);
    let back = eventually("a comes back", Duration::from_secs(10), || {
        all_answer(&proxy, "/web", &["a", "b"], 10)
    })
    .await;
    println!("checkInterval=300ms: a back in rotation after {back:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scaling_to_five_and_back_to_one_follows_the_registry_without_a_reconfigure() {
    // registrator-sample: `docker-compose scale app=5`, then `scale app=1`.
    let proxy = TestProxy::spawn().await;
    let mut instances = Vec::new();
    for n in 0..5 {
        instances.push(Instance::spawn(&format!("app{n}")).await);
    }
    proxy
        .register_instance("app", "app.app0", instances[0].port)
        .await;
    proxy
        .reconfigure_ok("serviceName=app&servicePath=/app")
        .await;
    assert_eq!(proxy.names_answering("/app", None, 3).await, ["app0"; 3]);

    register(&proxy, "app", &instances[1..].iter().collect::<Vec<_>>()).await;
    let names: Vec<String> = instances.iter().map(|i| i.name.clone()).collect();
    let names: Vec<&str> = names.iter().map(String::as_str).collect();
    eventually(
        "all five answer, round robin",
        Duration::from_secs(10),
        || all_answer(&proxy, "/app", &names, 10),
    )
    .await;

    for instance in &instances[1..] {
        proxy
            .deregister_instance(&format!("app.{}", instance.name))
            .await;
    }
    eventually("only app0 answers", Duration::from_secs(10), || {
        only(&proxy, "/app", "app0", 10)
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timeout_server_turns_a_slow_instance_into_a_504() {
    let proxy = TestProxy::spawn().await;
    let slow = Instance::spawn("slow").await;
    slow.behave(Behaviour::Slow(Duration::from_millis(2500)));
    register(&proxy, "report", &[&slow]).await;
    proxy
        .reconfigure_ok("serviceName=report&servicePath=/report")
        .await;
    let patient = ask(&proxy, "/report", &[]).await;
    assert_eq!(patient.status, 200, "the default waits: {patient:?}");

    proxy
        .reconfigure_ok("serviceName=report&servicePath=/report&timeoutServer=1s")
        .await;
    let started = Instant::now();
    let hurried = ask(&proxy, "/report", &[]).await;
    assert_eq!(hurried.status, 504, "{hurried:?}");
    assert!(
        started.elapsed() < Duration::from_millis(2400),
        "{:?}",
        started.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compression_gzips_text_for_clients_that_accept_it() {
    let proxy = TestProxy::spawn().await;
    let instance = Instance::spawn("docs").await;
    register(&proxy, "docs", &[&instance]).await;
    proxy
        .reconfigure_ok("serviceName=docs&servicePath=/big")
        .await;
    let gzip = [("Accept-Encoding", "gzip")];
    let plain = ask(&proxy, "/big", &gzip).await;
    assert_eq!(plain.status, 200);
    assert_eq!(
        plain.header("content-encoding"),
        None,
        "{:?}",
        plain.headers
    );

    proxy
        .reconfigure_ok(
            "serviceName=docs&servicePath=/big&compressionAlgo=gzip&compressionType=text/plain",
        )
        .await;
    let compressed = ask(&proxy, "/big", &gzip).await;
    assert_eq!(compressed.status, 200);
    assert_eq!(
        compressed.header("content-encoding"),
        Some("gzip"),
        "{:?}",
        compressed.headers
    );
    let refused = ask(&proxy, "/big", &[]).await;
    assert_eq!(
        refused.header("content-encoding"),
        None,
        "a client that does not accept gzip"
    );
}

/// An instance that keeps its connections open between requests (HTTP/1.1 keep-alive) and
/// counts the connections that carried at least one request (health checks carry none).
async fn spawn_keep_alive_instance() -> (u16, Arc<AtomicUsize>, tokio::task::JoinHandle<()>) {
    let listener = tokio::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .await
        .expect("bind instance");
    let port = listener.local_addr().expect("instance address").port();
    let used = Arc::new(AtomicUsize::new(0));
    let counter = used.clone();
    let task = tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let counter = counter.clone();
            tokio::spawn(async move {
                let mut first = true;
                while let Some(head) = read_head(&mut stream).await {
                    if first {
                        counter.fetch_add(1, Ordering::SeqCst);
                        first = false;
                    }
                    let body = "kept";
                    let answer = format!(
                        "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n\r\n{body}",
                        body.len()
                    );
                    if stream.write_all(answer.as_bytes()).await.is_err()
                        || head.to_ascii_lowercase().contains("connection: close")
                    {
                        return;
                    }
                }
            });
        }
    });
    (port, used, task)
}

/// Reads one request or answer head (up to the blank line) off `stream`; `None` at the end.
async fn read_head(stream: &mut tokio::net::TcpStream) -> Option<String> {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        match tokio::time::timeout(Duration::from_secs(10), stream.read(&mut byte)).await {
            Ok(Ok(1)) => head.push(byte[0]),
            _ => return None,
        }
    }
    Some(String::from_utf8_lossy(&head).into_owned())
}

/// Sends `count` requests for `path` one after the other on one keep-alive connection to the
/// proxy; every answer must be 200.
async fn requests_on_one_connection(port: u16, path: &str, count: usize) {
    let mut stream = tokio::net::TcpStream::connect((Ipv4Addr::LOCALHOST, port))
        .await
        .expect("HAProxy listens");
    for _ in 0..count {
        let request = format!("GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n");
        stream.write_all(request.as_bytes()).await.expect("send");
        let head = read_head(&mut stream).await.expect("an answer");
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
        let length: usize = head
            .lines()
            .find_map(|line| {
                let (name, value) = line.split_once(':')?;
                name.eq_ignore_ascii_case("content-length")
                    .then(|| value.trim().parse().ok())?
            })
            .expect("a content-length");
        let mut body = vec![0u8; length];
        stream.read_exact(&mut body).await.expect("the body");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_mode_http_server_close_opens_a_connection_to_the_instance_per_request() {
    let proxy = TestProxy::spawn().await;
    let (instance_port, used, _task) = spawn_keep_alive_instance().await;
    proxy.register_instance("api", "api.1", instance_port).await;
    let port = proxy.settings().http_port;

    // Keep-alive (HAProxy's default): five requests of one client share one connection.
    proxy
        .reconfigure_ok("serviceName=api&servicePath=/api")
        .await;
    requests_on_one_connection(port, "/api", 5).await;
    assert_eq!(used.load(Ordering::SeqCst), 1, "one connection, kept alive");

    // http-server-close: the instance sees a new connection for every request.
    proxy
        .reconfigure_ok("serviceName=api&servicePath=/api&connectionMode=http-server-close")
        .await;
    used.store(0, Ordering::SeqCst);
    requests_on_one_connection(port, "/api", 5).await;
    assert_eq!(used.load(Ordering::SeqCst), 5, "one connection per request");
}

/// Opens a TCP connection to `port` through the proxy, sends nothing, and asserts that HAProxy
/// closes it after about one second (the default would hold it for 60 s).
async fn assert_idle_tcp_client_closed_after_a_second(port: u16) {
    let mut stream = tokio::net::TcpStream::connect((Ipv4Addr::LOCALHOST, port))
        .await
        .expect("the tcp frontend listens");
    let started = Instant::now();
    let mut buffer = [0u8; 64];
    let read = tokio::time::timeout(Duration::from_secs(10), stream.read(&mut buffer))
        .await
        .expect("HAProxy closes the idle client well before the default 60 s");
    assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
    let idle = started.elapsed();
    assert!(
        idle >= Duration::from_millis(800) && idle < Duration::from_secs(5),
        "closed after {idle:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timeout_client_closes_an_idle_tcp_client() {
    let proxy = TestProxy::spawn().await;
    let instance = Instance::spawn("db").await;
    register(&proxy, "db", &[&instance]).await;
    let src_port = free_port();
    proxy
        .reconfigure_ok(&format!(
            "serviceName=db&reqMode=tcp&srcPort={src_port}&timeoutClient=1s"
        ))
        .await;
    assert_idle_tcp_client_closed_after_a_second(src_port).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timeout_tunnel_closes_an_idle_tcp_connection() {
    // In TCP mode the tunnel timeout replaces the client and server timeouts once the
    // connection to the instance is made.
    let proxy = TestProxy::spawn().await;
    let instance = Instance::spawn("cache").await;
    register(&proxy, "cache", &[&instance]).await;
    let src_port = free_port();
    proxy
        .reconfigure_ok(&format!(
            "serviceName=cache&reqMode=tcp&srcPort={src_port}&timeoutTunnel=1s"
        ))
        .await;
    assert_idle_tcp_client_closed_after_a_second(src_port).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_backend_tuning_values_are_refused_naming_the_parameter_and_change_nothing() {
    let (proxy, _backend) = proxy_routing_demo().await;
    let before = proxy.snapshot().await;
    let base = "serviceName=go-demo&servicePath=/demo";
    let cases = [
        (
            "balance=roundrobin%0A%20%20%20%20server%20evil%201.2.3.4:80",
            "balance",
        ),
        ("balance=url_param%20a%20b", "balance"),
        ("balance=hdr(X%20Y)", "balance"),
        ("timeoutServer=1s%20", "timeoutServer"),
        ("timeoutTunnel=forever", "timeoutTunnel"),
        ("timeoutClient=5s", "timeoutClient"),
        ("connectionMode=forceclose", "connectionMode"),
        ("compressionAlgo=brotli", "compressionAlgo"),
        (
            "compressionAlgo=gzip&compressionType=text/html%23x",
            "compressionType",
        ),
        ("sessionType=sticky", "sessionType"),
        ("checkPath=/health%0Aserver%20x%201.1.1.1:1", "checkPath"),
        ("checkInterval=0", "checkInterval"),
        ("maxFails=-1", "maxFails"),
        ("observe=layer3", "observe"),
        ("skipCheck=true&checkPath=/health", "checkPath"),
    ];
    proxy.assert_each_refused(base, &cases).await;
    proxy.assert_unchanged_since(&before).await;
    assert_eq!(proxy.names_answering("/demo", None, 1).await, ["demo"]);
}
