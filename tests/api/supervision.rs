//! flow-proxy supervises HAProxy: reloads drop nothing, old processes are reaped, and an HAProxy
//! that dies is started again with the last good configuration.

use std::time::Duration;

use reqwest::StatusCode;

use crate::helpers::{spawn_backend, TestProxy};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_haproxy_is_restarted_with_the_last_good_config() {
    let proxy = TestProxy::spawn().await;
    let backend = spawn_backend("survivor").await;
    proxy
        .register_instance("survivor", "survivor.1", backend.port)
        .await;
    assert_eq!(
        proxy
            .reconfigure("serviceName=survivor&servicePath=/survivor")
            .await
            .0,
        StatusCode::OK
    );
    let killed = proxy
        .haproxy_pid()
        .await
        .expect("HAProxy answers on its stats socket");

    // SAFETY: kill(2) on the HAProxy child this test started.
    unsafe {
        libc::kill(killed as libc::pid_t, libc::SIGKILL);
    }

    let mut restarted = None;
    for _ in 0..200 {
        match proxy.haproxy_pid().await {
            Some(pid) if pid != killed => {
                restarted = Some(pid);
                break;
            }
            _ => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
    assert!(restarted.is_some(), "a new HAProxy serves within 10 s");
    assert_eq!(
        proxy.names_answering("/survivor", None, 1).await,
        ["survivor"]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reloads_drop_no_request_and_leave_no_zombie() {
    let proxy = TestProxy::spawn().await;
    let backend = spawn_backend("steady").await;
    proxy
        .register_instance("steady", "steady.1", backend.port)
        .await;
    assert_eq!(
        proxy
            .reconfigure("serviceName=steady&servicePath=/steady")
            .await
            .0,
        StatusCode::OK
    );

    // Two clients, each opening a new connection per request, while HAProxy reloads 20 times.
    let port = proxy.http_port;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let clients: Vec<_> = (0..2)
        .map(|_| tokio::spawn(send_until_stopped(port, stop.clone())))
        .collect();
    for index in 0..20 {
        let query = format!("serviceName=other{index}&servicePath=/other{index}");
        assert_eq!(proxy.reconfigure(&query).await.0, StatusCode::OK);
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (mut sent, mut failures) = (0, Vec::new());
    for client in clients {
        let (client_sent, client_failures) = client.await.expect("traffic task");
        sent += client_sent;
        failures.extend(client_failures);
    }

    assert!(
        sent > 20,
        "traffic ran during the reloads ({sent} requests)"
    );
    assert!(
        failures.is_empty(),
        "{} of {sent} requests failed during 20 reloads: {failures:?}",
        failures.len()
    );
    assert!(
        zombie_children().is_empty(),
        "zombie HAProxy processes: {:?}",
        zombie_children()
    );
}

/// Sends `GET /steady` on a new connection each time until `stop` (at most 10,000 requests);
/// returns how many were sent and what failed.
async fn send_until_stopped(
    port: u16,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> (usize, Vec<String>) {
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .build()
        .expect("client");
    let mut failures = Vec::new();
    let mut sent = 0;
    while sent < 10_000 && !stop.load(std::sync::atomic::Ordering::Relaxed) {
        sent += 1;
        match client
            .get(format!("http://127.0.0.1:{port}/steady"))
            .send()
            .await
        {
            Ok(response) if response.status() == StatusCode::OK => {}
            Ok(response) => failures.push(response.status().to_string()),
            Err(error) => failures.push(error.to_string()),
        }
    }
    (sent, failures)
}

/// PIDs of this process's children that have exited but were not reaped, after old HAProxy
/// processes had a bounded time to finish.
pub fn zombie_children() -> Vec<u32> {
    let me = std::process::id();
    let mut zombies = Vec::new();
    for _ in 0..50 {
        zombies = std::fs::read_dir("/proc")
            .expect("/proc")
            .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse::<u32>().ok())
            .filter(|pid| {
                let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
                    return false;
                };
                // Fields after the command's closing parenthesis: state, ppid, …
                let Some(rest) = stat.rsplit_once(')').map(|(_, rest)| rest.to_string()) else {
                    return false;
                };
                let fields: Vec<&str> = rest.split_whitespace().collect();
                fields.first() == Some(&"Z") && fields.get(1) == Some(&me.to_string().as_str())
            })
            .collect();
        if zombies.is_empty() {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    zombies
}
