//! Instances and blue-green switches without a reload: a routed service's backends carry server
//! slots, and a change of its instances (an instance registered or deregistered, a color
//! switch) reaches the serving HAProxy over its Runtime API. Each test counts reloads by the PID
//! of the process serving on the stats socket (a reload starts a new process), and checks what
//! the user sees through HAProxy; then that a reload, a replaced HAProxy and a restarted
//! flow-proxy keep the same instances (the live file is rewritten with every runtime change).

use std::convert::Infallible;
use std::net::Ipv4Addr;
use std::time::Duration;

use reqwest::StatusCode;

use crate::fleet::eventually;
use crate::helpers::{spawn_backend, Backend, TestProxy};

/// A backend served by a task of this test, stopped when dropped.
struct SlowBackend {
    port: u16,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for SlowBackend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// How long an instance change may take to show through HAProxy (the watch's turn included).
const SHOWS: Duration = Duration::from_secs(3);

/// Requests per look: round robin over a few servers answers from each one that is up.
const SAMPLE: usize = 8;

/// How long the slow path of a [`spawn_slow_backend`] takes to answer.
const SLOW: Duration = Duration::from_millis(1500);

/// The backend names answering [`SAMPLE`] requests for `path`, sorted and without repeats.
async fn serving(proxy: &TestProxy, path: &str) -> Vec<String> {
    let mut names = proxy.names_answering(path, None, SAMPLE).await;
    names.sort();
    names.dedup();
    names
}

/// The PID of the HAProxy process serving now.
async fn serving_pid(proxy: &TestProxy) -> u32 {
    proxy
        .haproxy_pid()
        .await
        .expect("HAProxy answers on its stats socket")
}

/// The stats socket of `proxy`'s HAProxy.
fn stats_socket(proxy: &TestProxy) -> std::path::PathBuf {
    proxy
        .data_dir()
        .canonicalize()
        .expect("the data directory exists")
        .join("haproxy.sock")
}

/// The `server` lines of backend `backend` in the live haproxy.cfg.
async fn server_lines(proxy: &TestProxy, backend: &str) -> Vec<String> {
    let config = proxy.config().await;
    let mut inside = false;
    let mut lines = Vec::new();
    for line in config.lines() {
        if let Some(name) = line.strip_prefix("backend ") {
            inside = name.trim() == backend;
        } else if !line.starts_with(' ') {
            inside = false;
        } else if inside && line.trim_start().starts_with("server ") {
            lines.push(line.trim().to_string());
        }
    }
    lines
}

/// A backend like [`spawn_backend`] whose paths ending in `/slow` answer after [`SLOW`].
async fn spawn_slow_backend(name: &str) -> SlowBackend {
    let listener = tokio::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .await
        .expect("bind backend");
    let port = listener.local_addr().expect("backend address").port();
    let name = name.to_string();
    let app = axum::Router::new().fallback(move |uri: axum::http::Uri| {
        let name = name.clone();
        async move {
            if uri.path().ends_with("/slow") {
                tokio::time::sleep(SLOW).await;
            }
            Ok::<_, Infallible>(format!("{name} {}", uri.path()))
        }
    });
    let task = tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    SlowBackend { port, task }
}

/// A proxy routing `/web` of `web` to instance `one`.
async fn web_on_one() -> (TestProxy, Backend) {
    let proxy = TestProxy::spawn().await;
    let one = spawn_backend("one").await;
    proxy.register_instance("web", "web.1", one.port).await;
    proxy
        .reconfigure_ok("serviceName=web&servicePath=/web")
        .await;
    assert_eq!(serving(&proxy, "/web").await, ["one"]);
    (proxy, one)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_registered_instance_is_served_without_a_reload() {
    let (proxy, _one) = web_on_one().await;
    let pid = serving_pid(&proxy).await;
    assert_eq!(
        server_lines(&proxy, "web-be0").await.len(),
        2,
        "one instance gets two slots"
    );

    let two = spawn_backend("two").await;
    let registered = tokio::time::Instant::now();
    proxy.register_instance("web", "web.2", two.port).await;
    eventually("the new instance answers", SHOWS, || async {
        serving(&proxy, "/web").await == ["one", "two"]
    })
    .await;
    eprintln!(
        "registered → served by the new instance: {:?}",
        registered.elapsed()
    );

    assert_eq!(serving_pid(&proxy).await, pid, "HAProxy was not reloaded");
    assert!(
        server_lines(&proxy, "web-be0")
            .await
            .contains(&format!("server s2 127.0.0.1:{} check", two.port)),
        "the live file holds the new instance in the spare slot"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deregistered_instance_gets_no_more_requests_without_a_reload() {
    let (proxy, _one) = web_on_one().await;
    let two = spawn_backend("two").await;
    proxy.register_instance("web", "web.2", two.port).await;
    eventually("both instances answer", SHOWS, || async {
        serving(&proxy, "/web").await == ["one", "two"]
    })
    .await;
    let pid = serving_pid(&proxy).await;

    // The instance keeps running: only the registry says it is gone.
    proxy.deregister_instance("web.1").await;
    eventually("the deregistered instance is not routed", SHOWS, || async {
        serving(&proxy, "/web").await == ["two"]
    })
    .await;

    assert_eq!(
        proxy.names_answering("/web", None, 20).await,
        ["two"; 20],
        "no request reaches the deregistered instance"
    );
    assert_eq!(serving_pid(&proxy).await, pid, "HAProxy was not reloaded");
    assert_eq!(
        server_lines(&proxy, "web-be0").await,
        [
            "server s1 127.0.0.1:1 check disabled".to_string(),
            format!("server s2 127.0.0.1:{} check", two.port),
        ],
        "the live file holds the remaining instance in its slot"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blue_green_switch_moves_every_new_request_and_lets_blue_finish() {
    let proxy = TestProxy::spawn().await;
    let blue = spawn_slow_backend("blue").await;
    let green = spawn_backend("green").await;
    proxy
        .register_instance("demo-blue", "blue.1", blue.port)
        .await;
    proxy
        .register_instance("demo-green", "green.1", green.port)
        .await;
    proxy
        .reconfigure_ok("serviceName=demo&serviceColor=blue&servicePath=/demo")
        .await;
    let pid = serving_pid(&proxy).await;

    // One keep-alive client: its connection to HAProxy (and HAProxy's to blue) stays open.
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(1)
        .timeout(Duration::from_secs(10))
        .build()
        .expect("client");
    let url = format!("http://127.0.0.1:{}/demo", proxy.http_port);
    let answer = |client: reqwest::Client, url: String| async move {
        let response = client.get(&url).send().await.expect("HAProxy answers");
        let status = response.status();
        (status, response.text().await.expect("body"))
    };
    for _ in 0..3 {
        assert_eq!(
            answer(client.clone(), url.clone()).await,
            (StatusCode::OK, "blue /demo".to_string())
        );
    }
    let long_request = tokio::spawn(answer(client.clone(), format!("{url}/slow")));
    // The long request has reached blue before the switch.
    tokio::time::sleep(SLOW / 3).await;

    let switched = tokio::time::Instant::now();
    proxy
        .reconfigure_ok("serviceName=demo&serviceColor=green&servicePath=/demo")
        .await;
    eprintln!("blue-green switch answered after {:?}", switched.elapsed());
    for _ in 0..10 {
        assert_eq!(
            answer(client.clone(), url.clone()).await,
            (StatusCode::OK, "green /demo".to_string()),
            "every request after the answer goes to green"
        );
    }
    assert_eq!(
        long_request.await.expect("the long request's task"),
        (StatusCode::OK, "blue /demo/slow".to_string()),
        "the request to blue started before the switch finishes normally"
    );
    assert_eq!(serving_pid(&proxy).await, pid, "HAProxy was not reloaded");
    assert_eq!(
        proxy.stored_spec("demo").await.expect("stored")["ServiceColor"],
        "green",
        "the switch is stored"
    );
}

/// `web` routed to `one`, then `two` registered and `one` deregistered at runtime: the live
/// file's slots differ from a packed layout (s1 spare, s2 = two).
async fn web_moved_to_two() -> (TestProxy, Backend, Backend) {
    let (proxy, one) = web_on_one().await;
    let pid = serving_pid(&proxy).await;
    let two = spawn_backend("two").await;
    proxy.register_instance("web", "web.2", two.port).await;
    eventually("both instances answer", SHOWS, || async {
        serving(&proxy, "/web").await == ["one", "two"]
    })
    .await;
    proxy.deregister_instance("web.1").await;
    eventually("only the new instance answers", SHOWS, || async {
        serving(&proxy, "/web").await == ["two"]
    })
    .await;
    assert_eq!(serving_pid(&proxy).await, pid, "no reload so far");
    (proxy, one, two)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn instances_changed_at_runtime_stay_after_a_forced_reload() {
    let (proxy, _one, _two) = web_moved_to_two().await;
    let pid = serving_pid(&proxy).await;
    let (status, body) = proxy.api_get("/v1/docker-flow-proxy/reload").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_ne!(serving_pid(&proxy).await, pid, "/reload reloads");
    assert_eq!(
        proxy.names_answering("/web", None, 20).await,
        ["two"; 20],
        "the reloaded HAProxy serves the instances of the runtime change"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn instances_changed_at_runtime_stay_when_haproxy_is_replaced() {
    let (proxy, _one, _two) = web_moved_to_two().await;
    let killed = serving_pid(&proxy).await;
    // SAFETY: kill(2) on the HAProxy child this test's flow-proxy started.
    unsafe {
        libc::kill(killed as libc::pid_t, libc::SIGKILL);
    }
    eventually("a new HAProxy serves", Duration::from_secs(10), || async {
        proxy.haproxy_pid().await.is_some_and(|pid| pid != killed)
    })
    .await;
    assert_eq!(
        proxy.names_answering("/web", None, 20).await,
        ["two"; 20],
        "the replacement, started from the live file, serves the runtime change's instances"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn instances_changed_at_runtime_stay_after_flow_proxy_restarts() {
    let (mut proxy, _one, two) = web_moved_to_two().await;
    proxy.stop().await;
    proxy.start_again().await;
    assert_eq!(
        proxy.names_answering("/web", None, 20).await,
        ["two"; 20],
        "the restarted proxy serves the instances the registry has"
    );
    let pid = serving_pid(&proxy).await;

    // It follows instances at runtime again.
    let three = spawn_backend("three").await;
    proxy.register_instance("web", "web.3", three.port).await;
    eventually("the new instance answers", SHOWS, || async {
        serving(&proxy, "/web").await == ["three", "two"]
    })
    .await;
    assert_eq!(serving_pid(&proxy).await, pid, "HAProxy was not reloaded");
    assert!(server_lines(&proxy, "web-be0")
        .await
        .contains(&format!("server s2 127.0.0.1:{} check", two.port)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slots_running_out_cost_one_reload_then_instances_fit_again() {
    let (proxy, _one) = web_on_one().await;
    let mut backends = Vec::new();
    let mut expected = vec!["one".to_string()];
    // (instance, whether it needs a reload): 2 fits the two slots of one instance; 3 does not
    // (the backend grows to 8 slots); 4 fits again.
    for (index, reloads) in [(2, false), (3, true), (4, false)] {
        let name = format!("b{index}");
        let backend = spawn_backend(&name).await;
        let pid = serving_pid(&proxy).await;
        proxy
            .register_instance("web", &format!("web.{index}"), backend.port)
            .await;
        backends.push(backend);
        expected.push(name);
        expected.sort();
        eventually(&format!("instance {index} answers"), SHOWS, || async {
            serving(&proxy, "/web").await == expected
        })
        .await;
        let reloaded = serving_pid(&proxy).await != pid;
        assert_eq!(reloaded, reloads, "instance {index}: reloaded");
    }
    assert_eq!(server_lines(&proxy, "web-be0").await.len(), 8);
}

/// Whether HAProxy health-checks server `server` of `backend` (its `show stat` row has a
/// check status).
async fn health_checked(proxy: &TestProxy, backend: &str, server: &str) -> bool {
    let rows = flow_proxy::observe::haproxy_stats::read(&stats_socket(proxy))
        .await
        .expect("show stat");
    let row = rows
        .iter()
        .find(|row| row.proxy == backend && row.server == server)
        .unwrap_or_else(|| panic!("{backend}/{server} in show stat"));
    row.field("check_status").is_some()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn skip_check_toggles_and_instances_added_at_runtime_follow_it() {
    let (proxy, _one) = web_on_one().await;
    // skipCheck changes the backend's health lines: that is a reload.
    let pid = serving_pid(&proxy).await;
    proxy
        .reconfigure_ok("serviceName=web&servicePath=/web&skipCheck=true")
        .await;
    assert_ne!(serving_pid(&proxy).await, pid, "skipCheck=true reloads");
    assert!(!health_checked(&proxy, "web-be0", "s1").await);

    let pid = serving_pid(&proxy).await;
    let two = spawn_backend("two").await;
    proxy.register_instance("web", "web.2", two.port).await;
    eventually("the unchecked new instance answers", SHOWS, || async {
        serving(&proxy, "/web").await == ["one", "two"]
    })
    .await;
    assert_eq!(serving_pid(&proxy).await, pid, "no reload");
    assert!(
        !health_checked(&proxy, "web-be0", "s2").await,
        "with skipCheck the new instance is not health-checked"
    );
    assert!(server_lines(&proxy, "web-be0")
        .await
        .contains(&format!("server s2 127.0.0.1:{}", two.port)));

    proxy
        .reconfigure_ok("serviceName=web&servicePath=/web&skipCheck=false")
        .await;
    assert_ne!(serving_pid(&proxy).await, pid, "skipCheck=false reloads");
    let pid = serving_pid(&proxy).await;
    // Two slots, both taken: one instance leaves first so that the next one fits.
    proxy.deregister_instance("web.1").await;
    let three = spawn_backend("three").await;
    proxy.register_instance("web", "web.3", three.port).await;
    eventually("the checked new instance answers", SHOWS, || async {
        serving(&proxy, "/web").await == ["three", "two"]
    })
    .await;
    assert_eq!(serving_pid(&proxy).await, pid, "no reload");
    let checked = server_lines(&proxy, "web-be0")
        .await
        .into_iter()
        .find(|line| line.contains(&format!(":{} ", three.port)))
        .expect("the new instance has a slot");
    let slot = checked.split_whitespace().nth(1).expect("a server name");
    assert!(
        checked.ends_with(" check"),
        "the new instance's server is checked: {checked}"
    );
    eventually(
        "HAProxy health-checks the new instance",
        Duration::from_secs(10),
        || async { health_checked(&proxy, "web-be0", slot).await },
    )
    .await;
}
