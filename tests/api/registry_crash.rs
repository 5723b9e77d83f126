//! The embedded registry under SIGKILL: a real `flow-proxy` process (with its embedded
//! registry and HAProxy) takes KV writes from several clients and is killed mid-stream; every
//! write it acknowledged must be there when the registry starts again on the same data
//! directory.

use std::net::{Ipv4Addr, SocketAddr};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use flow_proxy::registry::embedded::EmbeddedRegistry;
use reqwest::{Client, StatusCode};
use tempfile::TempDir;
use tokio::time::Instant;

use crate::fleet::live_group_members;
use crate::helpers::free_port;

/// How many clients write at once.
const WRITERS: usize = 4;
/// How many acknowledged writes to wait for before the kill.
const ACKNOWLEDGED_BEFORE_KILL: usize = 400;
/// How long the process may take to start or to reach that many writes.
const DEADLINE: Duration = Duration::from_secs(30);

/// SIGKILLs the process group `group` leads (flow-proxy and its HAProxy).
fn kill_group(group: u32) {
    let group = libc::pid_t::try_from(group).expect("a pid fits pid_t");
    // SAFETY: kill(2) has no memory-safety preconditions; a negative pid names our child's group.
    unsafe {
        libc::kill(-group, libc::SIGKILL);
    }
}

#[tokio::test]
async fn sigkill_during_writes_loses_no_acknowledged_write() {
    let data = TempDir::new().unwrap();
    let registry_port = free_port();
    let registry = format!("http://127.0.0.1:{registry_port}");
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_flow-proxy"))
        .arg("--embedded-registry-address")
        .arg(format!("127.0.0.1:{registry_port}"))
        .arg("--api-address")
        .arg(format!("127.0.0.1:{}", free_port()))
        .arg("--bind-host")
        .arg("127.0.0.1")
        .arg("--http-port")
        .arg(free_port().to_string())
        .arg("--data-dir")
        .arg(data.path())
        .env_remove("CONSUL_ADDRESS")
        .env_remove("HAPROXY_BINARY")
        .env_remove("TEMPLATES_DIR")
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .process_group(0)
        .kill_on_drop(true)
        .spawn()
        .expect("start the flow-proxy binary");
    let group = child.id().expect("a running child has a pid");
    let client = Client::builder()
        .timeout(Duration::from_secs(5))
        .build()
        .unwrap();

    let started = Instant::now();
    loop {
        let ready = client
            .get(format!("{registry}/v1/status/leader"))
            .send()
            .await
            .is_ok_and(|r| r.status() == StatusCode::OK);
        if ready {
            break;
        }
        assert!(started.elapsed() < DEADLINE, "the registry never answered");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let acknowledged: Arc<Mutex<Vec<(String, String)>>> = Arc::default();
    let mut writers = Vec::new();
    for writer in 0..WRITERS {
        let (client, registry, acknowledged) =
            (client.clone(), registry.clone(), acknowledged.clone());
        writers.push(tokio::spawn(async move {
            for n in 0.. {
                let key = format!("crash/{writer}/{n:06}");
                let value = format!("{writer}-{n}-{}", "x".repeat(n % 300));
                let answer = client
                    .put(format!("{registry}/v1/kv/{key}"))
                    .body(value.clone())
                    .send()
                    .await;
                let Ok(response) = answer else { return };
                if response.status() != StatusCode::OK {
                    return;
                }
                if response.text().await.is_ok_and(|answer| answer == "true") {
                    acknowledged.lock().unwrap().push((key, value));
                }
            }
        }));
    }
    let started = Instant::now();
    while acknowledged.lock().unwrap().len() < ACKNOWLEDGED_BEFORE_KILL {
        assert!(
            started.elapsed() < DEADLINE,
            "the writes did not get through"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    kill_group(group);
    child.wait().await.unwrap();
    let killed = Instant::now();
    while !live_group_members(group).is_empty() {
        assert!(
            killed.elapsed() < DEADLINE,
            "still running after SIGKILL: {:?}",
            live_group_members(group)
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for writer in writers {
        writer.await.unwrap();
    }
    let acknowledged = acknowledged.lock().unwrap().clone();
    let log = data.path().join("registry/state.log");
    assert!(
        std::fs::metadata(&log).unwrap().len() > 0,
        "the writes are in the change log, which the restart replays"
    );

    let registry = EmbeddedRegistry::start(
        SocketAddr::from((Ipv4Addr::LOCALHOST, 0)),
        &data.path().canonicalize().unwrap(),
    )
    .await
    .expect("the registry starts on what the killed process left");
    let url = format!("http://{}", registry.address());
    let mut missing = Vec::new();
    for (key, value) in &acknowledged {
        let response = client
            .get(format!("{url}/v1/kv/{key}?raw"))
            .send()
            .await
            .unwrap();
        if response.status() != StatusCode::OK || response.text().await.unwrap() != *value {
            missing.push(key.clone());
        }
    }
    assert!(
        missing.is_empty(),
        "{} of {} acknowledged writes lost: {:?}",
        missing.len(),
        acknowledged.len(),
        &missing[..missing.len().min(10)]
    );
    registry.shutdown().await;
}
